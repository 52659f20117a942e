"""Forward-pass time of hooked_attn (no hooks, and with a full run_with_cache) against HF, side by side.

    python benchmarks/bench_forward.py [--threads 1] [--out benchmarks/results/forward.json]

Measures, never asserts. Each figure is a median from torch.utils.benchmark's blocked_autorange,
taken in the same process, so the ratios compare like with like on this machine.
"""

import argparse
import json
import platform
from pathlib import Path

import torch
import transformers
from torch.utils import benchmark

from hooked_attn import HookedTransformer


def shapes() -> dict[str, transformers.PretrainedConfig]:
    return {
        "gpt2-small-shape": transformers.GPT2Config(),
        "llama-shape-small": transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                                      num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                                      tie_word_embeddings=True),
    }


def median(stmt: str, **globals_: object) -> float:
    return benchmark.Timer(stmt=stmt, globals=globals_).blocked_autorange(min_run_time=1.0).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", default="1x32,4x128")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/forward.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    records = []
    for name, cfg in shapes().items():
        hf = {impl: transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()
              for impl in ("sdpa", "eager")}
        ours = HookedTransformer.from_pretrained_no_processing(hf["sdpa"])
        for size in args.sizes.split(","):
            batch, n_pos = map(int, size.split("x"))
            tokens = torch.randint(0, cfg.vocab_size, (batch, n_pos))
            t = {f"hf_{impl}": median("m(tokens)", m=m, tokens=tokens) for impl, m in hf.items()}
            t["hooked"] = median("m(tokens)", m=ours, tokens=tokens)
            t["hooked_cache_all"] = median("m.run_with_cache(tokens)", m=ours, tokens=tokens)
            rec = {"model": name, "batch": batch, "pos": n_pos, "dtype": "float32", "threads": args.threads,
                   **{f"{k}_s": v for k, v in t.items()},
                   "hooked_over_hf_sdpa": t["hooked"] / t["hf_sdpa"],
                   "hooked_over_hf_eager": t["hooked"] / t["hf_eager"],
                   "cache_all_over_forward": t["hooked_cache_all"] / t["hooked"]}
            records.append(rec)
            print(json.dumps(rec))
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
           "processor": platform.processor(), "cpus": torch.get_num_threads()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "records": records}, indent=1))


if __name__ == "__main__":
    main()
