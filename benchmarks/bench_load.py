"""Load time and peak RSS growth from a local safetensors folder: hooked_attn (processed and not) / HF.

    python benchmarks/bench_load.py [--models gpt2-small-shape,smollm2-135m] [--dtypes float32,bfloat16]

Every measurement runs in a fresh process (``--child``), which imports everything first (both sides'
lazily imported modeling code included), resets the kernel's peak-RSS mark, loads (the tokenizer is loaded
beforehand and passed in, since HF's ``from_pretrained`` loads none), and reports the wall time, the peak
RSS growth over the RSS before the load, the loaded model's parameter bytes, and the time to the first
logits (the load and one 1 x 32 forward). HF's ``from_pretrained`` memory-maps safetensors, so its pages
become resident only as they are read: its growth is low until the first forward. Loading from an HF model
already in memory is measured too, with its weights copied (the default) and taken (``release_source``).
Measures, never asserts.
"""

import argparse
import json
import time

import torch

from benchmarks.common import (
    RESULTS, param_bytes, peak_rss_bytes, reset_peak_rss, rss_bytes, run_child, save_shape, smollm2_folder, write_results,
)

LOADERS = ("hf", "hooked_processed", "hooked_unprocessed")
# From an HF model already in memory (its weights private copies, as after from_config or training),
# processed: weights copied (the default), or taken with release_source=True.
IN_MEMORY = ("in_memory_copied", "in_memory_released")


def child(loader: str, folder: str, dtype_name: str) -> dict:
    import transformers

    from hooked_attn import HookedTransformer

    import hooked_attn.loading  # noqa: F401  (imported lazily by from_pretrained)
    from hooked_attn.memory import release_free_memory

    dtype = getattr(torch, dtype_name)
    # HF's from_pretrained loads no tokenizer; ours would load the folder's, so it is loaded first and
    # passed in, and both sides measure the weights alone. Likewise the code each side imports lazily
    # (HF's modeling modules take about a second) is imported first, by both.
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    architecture = transformers.AutoConfig.from_pretrained(folder).architectures[0]
    getattr(transformers, architecture), transformers.AutoModelForCausalLM.from_config  # noqa: B018
    source = None
    if loader in IN_MEMORY:
        source = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        for param in source.parameters():  # off the memory map: every page private and resident
            param.data = param.data.clone()
        release_free_memory()  # what the clones replaced goes back to the OS, not into our load
    before = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    if source is not None:
        model = HookedTransformer.from_pretrained(source, dtype=dtype, tokenizer=tokenizer,
                                                  release_source=loader == "in_memory_released")
    elif loader == "hf":
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    elif loader == "hooked_processed":
        model = HookedTransformer.from_pretrained(folder, dtype=dtype, tokenizer=tokenizer)
    else:
        model = HookedTransformer.from_pretrained_no_processing(folder, dtype=dtype, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    growth = peak_rss_bytes() - before
    # HF's load reads no weight until the first forward; this is the time to the first logits.
    tokens = torch.arange(32)[None] % 1000
    with torch.no_grad():
        model(tokens)
    first_logits = time.perf_counter() - start
    return {"loader": loader, "seconds": seconds, "peak_rss_growth_bytes": growth, "param_bytes": param_bytes(model),
            "growth_over_param_bytes": growth / param_bytes(model), "first_logits_seconds": first_logits}


def run(names: list[str], dtypes: list[str], repeats: int = 3) -> list[dict]:
    records = []
    for name in names:
        folder = smollm2_folder() if name == "smollm2-135m" else save_shape(name, RESULTS / "models" / name)
        for dtype in dtypes:
            runs = {loader: [run_child(["-m", "benchmarks.bench_load", "--child", loader, str(folder), dtype])
                             for _ in range(repeats)] for loader in LOADERS}
            med = {loader: sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2] for loader, rs in runs.items()}
            rec = {"op": "load", "model": name, "dtype": dtype, "repeats": repeats,
                   **{f"{loader}_{k}": v for loader, r in med.items() for k, v in r.items() if k != "loader"}}
            for loader in LOADERS[1:]:
                rec[f"{loader}_over_hf_seconds"] = med[loader]["seconds"] / med["hf"]["seconds"]
                first = {side: sorted(r["first_logits_seconds"] for r in runs[side])[len(runs[side]) // 2]
                         for side in ("hf", loader)}
                rec[f"{loader}_over_hf_first_logits_seconds"] = first[loader] / first["hf"]
            for loader in IN_MEMORY:
                rs = [run_child(["-m", "benchmarks.bench_load", "--child", loader, str(folder), dtype])
                      for _ in range(repeats)]
                r = sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2]
                rec[f"{loader}_growth_over_param_bytes"] = r["growth_over_param_bytes"]
                rec[f"{loader}_seconds"] = r["seconds"]
            records.append(rec)
            print(json.dumps(rec), flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2-small-shape,smollm2-135m")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("LOADER", "FOLDER", "DTYPE"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    records = run(args.models.split(","), args.dtypes.split(","), args.repeats)
    write_results("load", records)


if __name__ == "__main__":
    main()
