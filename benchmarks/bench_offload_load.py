"""Peak memory of loading an HF checkpoint onto a device map group by group (hooked_attn.scale.streaming).
Measures, never asserts.

    python -m benchmarks.bench_offload_load [--model random-llama smollm2]

For each model (a random LLaMA with ~105 MiB of fp32 weights saved as an HF folder; the real
SmolLM2-135M that setup prepares), four loads, each in a fresh child process: without a device map
(the whole model in memory), onto ``{"": "cpu"}`` (the same model, loaded group by group), onto
``{"": "disk"}`` (preparing an offload folder: every unit written to it) and onto a cpu/disk mix (the
embedding and two blocks kept in memory, the rest on disk). Two figures: the child's peak RSS growth
during its first ``from_pretrained`` (VmHWM after, minus RSS before; the mark is reset after a warm-up
load of a tiny model through the same path, so the figure is the model's data, not code), against the
bytes of the loaded model's weights; and the median wall time of ``--repeats`` loads in that child
(``seconds``; the first included, each after the previous model is dropped).
"""

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from benchmarks.common import peak_rss_bytes, reset_peak_rss, rss_bytes, run_child, smollm2_folder, write_results

RANDOM_LLAMA = transformers.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                        num_attention_heads=8, num_key_value_heads=4, vocab_size=4096,
                                        max_position_embeddings=128, tie_word_embeddings=False)
WARM_UP = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=4, vocab_size=4096, max_position_embeddings=128)
MAPS = {"whole model in memory": None, "all on cpu, group by group": {"": "cpu"}, "prepare offload folder": {"": "disk"},
        "cpu/disk mix": {"": "disk", "embed": "cpu", "blocks.0": "cpu", "blocks.1": "cpu"}}


def child(source: str, warm: str, work: str, device_map_json: str, repeats: str) -> None:
    from hooked_attn import HookedTransformer

    device_map = json.loads(device_map_json)
    extra = {} if device_map is None else {"device_map": device_map}
    with torch.no_grad():  # the code a first load and forward need, before the mark is reset
        tokens = torch.zeros(1, 4, dtype=torch.long)
        HookedTransformer.from_pretrained(warm, **extra, **({"offload_folder": work + "/warm"} if extra else {}))(tokens)
    reset_peak_rss()
    before = rss_bytes()
    start = time.perf_counter()
    model = HookedTransformer.from_pretrained(source, **extra, **({"offload_folder": work + "/model"} if extra else {}))
    seconds = [time.perf_counter() - start]
    peak = peak_rss_bytes()
    weights = sum(p.nbytes for p in model.parameters() if not p.is_meta)
    with torch.device("meta"):
        total = sum(p.nbytes for p in HookedTransformer(model.cfg).to(model.dtype).parameters())
    for _ in range(int(repeats) - 1):
        del model
        gc.collect()
        start = time.perf_counter()
        model = HookedTransformer.from_pretrained(source, **extra, **({"offload_folder": work + "/model"} if extra else {}))
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"peak_rss_growth_bytes": peak - before, "weights_bytes": total, "resident_weights_bytes": weights,
                      "seconds": statistics.median(seconds), "all_seconds": seconds}))


def run(models: list[str], repeats: int) -> list[dict]:
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(WARM_UP).save_pretrained(Path(tmp) / "warm")
        for name in models:
            if name == "smollm2":
                source = smollm2_folder()
            else:
                source = Path(tmp) / name
                transformers.AutoModelForCausalLM.from_config(RANDOM_LLAMA).save_pretrained(source)
            for op, device_map in MAPS.items():
                work = tempfile.mkdtemp(dir=tmp)
                record = run_child(["-m", "benchmarks.bench_offload_load", "--child", str(source), str(Path(tmp) / "warm"),
                                    work, json.dumps(device_map), str(repeats)])
                record |= {"model": name, "op": op, "device_map": device_map,
                           "growth_over_weights": record["peak_rss_growth_bytes"] / record["weights_bytes"]}
                print(json.dumps(record), flush=True)
                records.append(record)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["random-llama", "smollm2"], choices=["random-llama", "smollm2"])
    parser.add_argument("--repeats", type=int, default=3, help="loads timed per child (median reported)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    write_results("offload_load", run(args.model, args.repeats))


if __name__ == "__main__":
    sys.exit(main())
