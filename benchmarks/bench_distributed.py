"""Scaling over processes and memory under disk offload (hooked_attn.scale). Measures, never asserts.

    python -m benchmarks.bench_distributed [--procs 1 2] [--pos 24] [--threads 1]

1. A patching sweep (``hook_z`` at every layer, position and head, ``sharded_activation_patch``) run
   by ``torchrun --standalone --nproc-per-node N`` (gloo) for each N in ``--procs``, each rank using
   ``--threads`` threads: the median sweep time of rank 0 over 3 runs after a warm-up, timed between
   barriers (process start and model building excluded), and the speedup over the first N.
2. Disk offload: a child process loads a random LLaMA (~105 MiB fp32) from an offload folder and runs
   one forward; its peak RSS growth (VmHWM after, minus RSS before loading) against the weights' bytes.
   A forward of a tiny offloaded model first loads the code a first forward needs (torch._dynamo, which
   accelerate's hooks import, kernels), so the figure is the model's data.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from benchmarks.common import ROOT, param_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes, write_results

SWEEP_MODEL = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                                       num_attention_heads=8, num_key_value_heads=4, vocab_size=4096,
                                       max_position_embeddings=128)
OFFLOAD_MODEL = transformers.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                         num_attention_heads=8, num_key_value_heads=4, vocab_size=4096,
                                         max_position_embeddings=128)
WARM_UP_MODEL = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=4, vocab_size=4096,
                                         max_position_embeddings=128)


def _model(cfg: transformers.LlamaConfig):
    from hooked_attn import HookedTransformer

    torch.manual_seed(0)
    return HookedTransformer.from_pretrained(transformers.AutoModelForCausalLM.from_config(cfg).eval())


def worker(n_pos: int) -> None:
    """One torchrun rank: time the sharded sweep; rank 0 prints a JSON record."""
    import torch.distributed as dist

    from hooked_attn.patching import layer_pos_head_vector_patch_setter
    from hooked_attn.scale import init_distributed, sharded_activation_patch

    rank, world = init_distributed()
    torch.set_grad_enabled(False)
    model = _model(SWEEP_MODEL)
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, SWEEP_MODEL.vocab_size, (1, n_pos), generator=gen)
    corrupted = torch.randint(0, SWEEP_MODEL.vocab_size, (1, n_pos), generator=gen)
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_z"))

    def sweep() -> torch.Tensor:
        return sharded_activation_patch(model, corrupted, clean_cache, lambda logits: logits[0, -1, 0],
                                        layer_pos_head_vector_patch_setter, "z", ["layer", "pos", "head"])

    times = []
    for _ in range(4):  # the first is a warm-up
        dist.barrier()
        start = time.perf_counter()
        result = sweep()
        dist.barrier()
        times.append(time.perf_counter() - start)
    if rank == 0:
        print(json.dumps({"op": "sharded_activation_patch z", "processes": world, "threads_per_process":
                          torch.get_num_threads(), "patches": result.numel(), "pos": n_pos,
                          "seconds": sorted(times[1:])[1]}))
    dist.destroy_process_group()


def offload_child(folder: str, warm_folder: str) -> None:
    from hooked_attn.scale import load_offloaded

    tokens = torch.randint(0, OFFLOAD_MODEL.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # loads the code a first offloaded forward needs (~40 MB), before the peak is reset
        load_offloaded(warm_folder)(tokens)
    reset_peak_rss()
    before = rss_bytes()
    model = load_offloaded(folder)
    with torch.no_grad():
        model(tokens)
    print(json.dumps({"rss_before": before, "peak_rss": peak_rss_bytes()}))


def run(procs: list[int], n_pos: int, threads: int) -> list[dict]:
    records = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    for n in procs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               "-m", "benchmarks.bench_distributed", "--worker", "--pos", str(n_pos)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=True)
        record = json.loads(done.stdout.strip().splitlines()[-1])
        record["command"] = f"OMP_NUM_THREADS={threads} torchrun --standalone --nproc-per-node {n} ..."
        records.append(record)
    base = records[0]["seconds"]
    for record in records:
        record["speedup_vs_first"] = base / record["seconds"]
    from hooked_attn.scale import save_offloaded

    with tempfile.TemporaryDirectory() as folder:
        model = _model(OFFLOAD_MODEL)
        weights = param_bytes(model)
        save_offloaded(model, Path(folder) / "model")
        del model
        save_offloaded(_model(WARM_UP_MODEL), Path(folder) / "warm_up")
        done = subprocess.run([sys.executable, "-m", "benchmarks.bench_distributed", "--offload-child",
                               str(Path(folder) / "model"), str(Path(folder) / "warm_up")],
                              capture_output=True, text=True, cwd=ROOT, env=env, check=True)
        child = json.loads(done.stdout.strip().splitlines()[-1])
    growth = child["peak_rss"] - child["rss_before"]
    records.append({"op": "load_offloaded + forward", "weights_bytes": weights, "peak_rss_growth_bytes": growth,
                    "growth_over_weights": growth / weights})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pos", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--offload-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.pos)
    if args.offload_child:
        return offload_child(*args.offload_child)
    records = run(args.procs, args.pos, args.threads)
    for record in records:
        print(json.dumps(record))
    write_results("distributed", records)


if __name__ == "__main__":
    main()
