"""Forward time with no hooks, and run_with_cache of everything or a filtered set, against HF side by side.

    python benchmarks/bench_forward.py [--threads 1] [--sizes 1x32,4x128,8x512] [--dtypes float32,bfloat16]

Measures, never asserts. Each figure is a median from torch.utils.benchmark's blocked_autorange, all
taken in one process, so each ratio compares like with like on this machine.
"""

import argparse
import json
from collections.abc import Iterator

import torch
import transformers

from benchmarks.common import median_seconds, shapes, smollm2_folder, write_results
from hooked_attn import HookedTransformer

CACHE_SIZE = (4, 128)


def models(names: list[str], dtype: torch.dtype) -> Iterator[tuple[str, dict, HookedTransformer, int]]:
    """(name, {"sdpa": HF, "eager": HF}, ours, vocab size) for each model, one at a time."""
    for name in names:
        if name == "smollm2-135m":
            folder = smollm2_folder()
            hf = {impl: transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=impl)
                  for impl in ("sdpa", "eager")}
        else:
            torch.manual_seed(0)
            hf = {"sdpa": transformers.AutoModelForCausalLM.from_config(shapes()[name], attn_implementation="sdpa")}
            hf["eager"] = transformers.AutoModelForCausalLM.from_config(shapes()[name], attn_implementation="eager")
            hf["eager"].load_state_dict(hf["sdpa"].state_dict())
            hf = {impl: m.to(dtype) for impl, m in hf.items()}
        hf = {impl: m.eval() for impl, m in hf.items()}
        ours = HookedTransformer.from_pretrained(hf["sdpa"], dtype=dtype)
        yield name, hf, ours, hf["sdpa"].config.vocab_size
        del hf, ours


def run(names: list[str], sizes: list[tuple[int, int]], dtypes: list[torch.dtype], min_run_time: float = 1.0) -> list[dict]:
    records = []
    torch.set_grad_enabled(False)
    for dtype in dtypes:
        for name, hf, ours, vocab in models(names, dtype):
            for batch, n_pos in sizes:
                tokens = torch.randint(0, vocab, (batch, n_pos), generator=torch.Generator().manual_seed(0))
                t = {f"hf_{impl}_s": median_seconds(lambda m=m: m(tokens), min_run_time) for impl, m in hf.items()}
                t["hooked_s"] = median_seconds(lambda: ours(tokens), min_run_time)
                rec = {"op": "forward", "model": name, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
                       "pos": n_pos, **t, "hooked_over_hf_sdpa": t["hooked_s"] / t["hf_sdpa_s"],
                       "hooked_over_hf_eager": t["hooked_s"] / t["hf_eager_s"]}
                records.append(rec)
                print(json.dumps(rec), flush=True)
                if (batch, n_pos) == CACHE_SIZE and dtype == torch.float32:
                    records.append(cache_record(name, ours, hf["sdpa"], tokens, t, min_run_time))
                    print(json.dumps(records[-1]), flush=True)
    return records


def cache_record(name: str, ours: HookedTransformer, hf: torch.nn.Module, tokens: torch.Tensor, t: dict,
                 min_run_time: float) -> dict:
    every = median_seconds(lambda: ours.run_with_cache(tokens), min_run_time)
    resid = median_seconds(lambda: ours.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_pre")),
                           min_run_time)
    _, cache = ours.run_with_cache(tokens)
    return {"op": "run_with_cache", "model": name, "dtype": "float32", "batch": tokens.shape[0], "pos": tokens.shape[1],
            "hooks_cached": len(cache), "cache_bytes": sum(v.numel() * v.element_size() for v in cache.values()),
            "cache_all_s": every, "cache_resid_pre_s": resid, "hooked_s": t["hooked_s"], "hf_sdpa_s": t["hf_sdpa_s"],
            "cache_all_over_hooked": every / t["hooked_s"], "cache_all_over_hf_sdpa": every / t["hf_sdpa_s"],
            "cache_resid_pre_over_hf_sdpa": resid / t["hf_sdpa_s"]}


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(n) for n in size.split("x")) for size in text.split(",")]  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="gpt2-small-shape,llama-shape,smollm2-135m")
    parser.add_argument("--sizes", default="1x32,4x128,8x512")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--min-run-time", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = run(args.models.split(","), parse_sizes(args.sizes), [getattr(torch, d) for d in args.dtypes.split(",")],
                  args.min_run_time)
    write_results("forward", records)


if __name__ == "__main__":
    main()
