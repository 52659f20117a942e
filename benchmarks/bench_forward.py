"""Forward time with no hooks, and run_with_cache of everything or a filtered set, against HF side by side.

    python benchmarks/bench_forward.py [--threads 1] [--sizes 1x32,4x128,8x512] [--dtypes float32,bfloat16]

Measures, never asserts. The sides of each ratio are timed in turn, in five rounds (three for 8x512) whose
order rotates (torch.utils.benchmark's blocked_autorange within a round), all in one process, and each figure
is the median over the rounds: a slow spell of the machine falls on both sides alike. The run_with_cache
records are taken twice: with glibc's default allocator settings, and in a child process with
``hooked_attn.keep_freed_memory()`` on.
"""

import argparse
import json
from collections.abc import Iterator

import torch
import transformers

from benchmarks.common import interleaved, run_child_records, shapes, smollm2_folder, write_results
from hooked_attn import HookedTransformer, keep_freed_memory
from hooked_attn.cache import storage_nbytes

CACHE_SIZE = (4, 128)
ROUNDS = 5  # each ratio's two sides are timed in turn, five times over
LONG_ROUNDS, LONG_TOKENS = 3, 4096  # three times for batches this big (8x512: 5-20 s a call)
KEEP_FLAG = "--keep-freed-memory"


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


def run(names: list[str], sizes: list[tuple[int, int]], dtypes: list[torch.dtype], min_run_time: float = 1.0,
        cache_only: bool = False, keep_freed: bool = False) -> list[dict]:
    """Forward records for every model, size and dtype, and run_with_cache records at CACHE_SIZE in
    float32 (with ``cache_only``, those alone; ``keep_freed`` says keep_freed_memory() is on)."""
    records = []
    torch.set_grad_enabled(False)
    for dtype in dtypes:
        for name, hf, ours, vocab in models(names, dtype):
            for batch, n_pos in sizes:
                tokens = torch.randint(0, vocab, (batch, n_pos), generator=torch.Generator().manual_seed(0))
                if not cache_only:
                    sides = {f"hf_{impl}_s": (lambda m=m: m(tokens)) for impl, m in hf.items()}
                    rounds = ROUNDS if batch * n_pos < LONG_TOKENS else LONG_ROUNDS
                    t = interleaved({**sides, "hooked_s": lambda: ours(tokens)}, rounds, min_run_time / rounds)
                    records.append({
                        "op": "forward", "model": name, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
                        "pos": n_pos, **t, "hooked_over_hf_sdpa": t["hooked_s"] / t["hf_sdpa_s"],
                        "hooked_over_hf_eager": t["hooked_s"] / t["hf_eager_s"]})
                    print(json.dumps(records[-1]), flush=True)
                if (batch, n_pos) == CACHE_SIZE and dtype == torch.float32:
                    records.append(cache_record(name, ours, hf["sdpa"], tokens, min_run_time, keep_freed))
                    print(json.dumps(records[-1]), flush=True)
    return records


def cache_record(name: str, ours: HookedTransformer, hf: torch.nn.Module, tokens: torch.Tensor, min_run_time: float,
                 keep_freed: bool) -> dict:
    t = interleaved({
        "hf_sdpa_s": lambda: hf(tokens), "hooked_s": lambda: ours(tokens),
        "cache_all_s": lambda: ours.run_with_cache(tokens),
        "cache_resid_pre_s": lambda: ours.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_pre")),
    }, ROUNDS, min_run_time / ROUNDS)
    _, cache = ours.run_with_cache(tokens)
    return {"op": "run_with_cache", "model": name, "dtype": "float32", "batch": tokens.shape[0], "pos": tokens.shape[1],
            "keep_freed_memory": keep_freed, "hooks_cached": len(cache), "cache_bytes": storage_nbytes(cache.values()),
            **t, "cache_all_over_hooked": t["cache_all_s"] / t["hooked_s"],
            "cache_all_over_hf_sdpa": t["cache_all_s"] / t["hf_sdpa_s"],
            "cache_resid_pre_over_hf_sdpa": t["cache_resid_pre_s"] / t["hf_sdpa_s"]}


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(n) for n in size.split("x")) for size in text.split(",")]  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="gpt2-small-shape,llama-shape,smollm2-135m")
    parser.add_argument("--sizes", default="1x32,4x128,8x512")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument(KEEP_FLAG, action="store_true",
                        help="only the run_with_cache records, with hooked_attn.keep_freed_memory() on (the setting "
                             "lasts for the process, so the default run starts a child process for these)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        kept = keep_freed_memory()  # the records print as they are made: the parent reads them
        run(args.models.split(","), [CACHE_SIZE], [torch.float32], args.min_run_time, cache_only=True, keep_freed=kept)
        return
    write_results("forward", run_both(args.models.split(","), parse_sizes(args.sizes),
                                      [getattr(torch, d) for d in args.dtypes.split(",")], args.min_run_time))


def run_both(names: list[str], sizes: list[tuple[int, int]], dtypes: list[torch.dtype],
             min_run_time: float = 1.0) -> list[dict]:
    """``run`` here, then the run_with_cache records again in a child process with keep_freed_memory() on."""
    return run(names, sizes, dtypes, min_run_time) + run_child_records([
        "-m", "benchmarks.bench_forward", KEEP_FLAG, "--models", ",".join(names),
        "--threads", str(torch.get_num_threads()), "--min-run-time", str(min_run_time)])


if __name__ == "__main__":
    main()
