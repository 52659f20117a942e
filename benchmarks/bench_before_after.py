"""Load time, load peak RSS and forward speed of hooked_attn from two source trees, side by side.

    git worktree add /tmp/before <commit>
    python -m benchmarks.bench_before_after --before /tmp/before --after . [--repeats 5] [--threads 1]

Each measurement runs in a fresh process whose ``PYTHONPATH`` starts with one tree, so ``import
hooked_attn`` takes that tree's code; the two trees' processes alternate (before, after, before, ...)
so that a slow spell of the shared machine falls on both alike, and each figure is the median over
``--repeats`` processes. A process imports everything first, loads the default model (SmolLM2-135M,
the folder ``scripts/setup.sh`` prepares) with ``HookedTransformer.from_pretrained(folder,
tokenizer=...)`` (processed, float32; the tokenizer is loaded beforehand and passed in), reports the
wall seconds and the peak RSS growth over the RSS before the load, then times the forward pass with no
hooks (``torch.utils.benchmark``'s ``blocked_autorange``) on random tokens of a few sizes. The child
uses only what both trees offer (the public ``from_pretrained`` and forward); it reads /proc itself, so
it imports nothing of either tree's ``benchmarks``. Measures, never asserts.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = ((1, 32), (4, 128))


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(folder: str, threads: int) -> dict:
    import torch
    import torch.utils.benchmark as benchmark
    import transformers

    import hooked_attn
    from hooked_attn import HookedTransformer

    torch.set_num_threads(threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    transformers.LlamaForCausalLM  # noqa: B018  (HF's lazily imported modeling code, imported before timing)
    before = _rss()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark (VmHWM)
    start = time.perf_counter()
    model = HookedTransformer.from_pretrained(folder, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    growth = _peak_rss() - before
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    record = {"tree": str(Path(hooked_attn.__file__).parent.parent), "load_seconds": seconds,
              "load_peak_rss_growth_bytes": growth, "param_bytes": params,
              "load_growth_over_param_bytes": growth / params}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch, pos in SIZES:
            tokens = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)
            timer = benchmark.Timer(stmt="model(tokens)", globals={"model": model, "tokens": tokens})
            record[f"forward_{batch}x{pos}_seconds"] = timer.blocked_autorange(min_run_time=1.0).median
    return record


def run_child(tree: Path, folder: str, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--child", folder, "--threads", str(threads)], env=env,
                         check=True, capture_output=True, text=True, cwd=tree).stdout
    record = json.loads(out.strip().splitlines()[-1])
    if Path(record["tree"]).resolve() != tree.resolve():
        raise RuntimeError(f"the child imported hooked_attn from {record['tree']}, not from {tree}")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path)
    parser.add_argument("--after", type=Path, default=Path("."))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the medians and every run here (JSON)")
    parser.add_argument("--child", metavar="FOLDER")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads)))
        return
    from hooked_attn.default_model import prepare_smollm2

    folder = str(prepare_smollm2())
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(args.repeats):
        for side in ("before", "after"):
            runs[side].append(run_child(getattr(args, side), folder, args.threads))
    keys = [k for k in runs["after"][0] if k != "tree"]
    result = {"model": "smollm2-135m", "dtype": "float32", "threads": args.threads, "repeats": args.repeats,
              **{side: {k: statistics.median(r[k] for r in rs) for k in keys} for side, rs in runs.items()},
              "runs": runs}
    print(json.dumps({side: result[side] for side in ("before", "after")}, indent=1))
    for k in keys:
        spread = {side: f"{min(r[k] for r in rs):.4g}-{max(r[k] for r in rs):.4g}" for side, rs in runs.items()}
        print(f"{k:34s} before {result['before'][k]:.4g} ({spread['before']})  after {result['after'][k]:.4g} "
              f"({spread['after']})  after/before {result['after'][k] / result['before'][k]:.3f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
