"""wrap() overhead: the unwrapped model, the wrapped model with nothing hooked, and caching patterns only.

    python -m benchmarks.bench_wrap [--rounds 7] [--min-run-time 0.5]

Models with random weights: TabPFN v2 (tabpfn 9.2.0; 2 layers, 200 train + 50 test rows, 8 features)
and an HF ViT (4 layers, d_model 128, 64 patches, batch 8, attn_implementation="sdpa"). Measures,
never asserts: each side is timed in turn over rotating rounds (``benchmarks.common.interleaved``)
and the median is kept; results go to benchmarks/results/wrap.json.
"""

import argparse
import json

import torch
import transformers

from benchmarks.common import interleaved, write_results
from hooked_attn import wrap


def tabpfn_v2() -> tuple[torch.nn.Module, tuple, dict]:
    from tabpfn.architectures import tabpfn_v2 as v2

    cfg, _ = v2.parse_config({"max_num_classes": 10, "num_buckets": 100, "nlayers": 2, "emsize": 96, "nhead": 4})
    x, y = torch.randn(250, 1, 8), torch.randint(0, 3, (200, 1)).float()
    return v2.get_architecture(cfg).eval(), (x, y), {}


def vit() -> tuple[torch.nn.Module, tuple, dict]:
    cfg = transformers.ViTConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                                 image_size=64, patch_size=8, attn_implementation="sdpa")
    return transformers.ViTModel(cfg).eval(), (), {"pixel_values": torch.randn(8, 3, 64, 64)}


MODELS = {"tabpfn_v2": tabpfn_v2, "hf_vit": vit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args()
    torch.manual_seed(0)
    records = []
    for name, build in MODELS.items():
        model, model_args, kwargs = build()
        wrapped = wrap(model)
        with torch.no_grad():
            wrapped.discover(*model_args, **kwargs)

            def patterns_only() -> object:
                return wrapped.run_with_cache(*model_args, names_filter=lambda n: n.endswith("hook_pattern"), **kwargs)

            times = interleaved({
                "unwrapped": lambda: model(*model_args, **kwargs),
                "wrapped_unhooked": lambda: wrapped(*model_args, **kwargs),
                "wrapped_cache_patterns": patterns_only,
            }, rounds=args.rounds, min_run_time=args.min_run_time)
        record = {"model": name, "attention_calls": len(wrapped.attention_layers), "threads": torch.get_num_threads(),
                  **{f"{side}_s": t for side, t in times.items()},
                  "unhooked_overhead": times["wrapped_unhooked"] / times["unwrapped"] - 1,
                  "cache_patterns_overhead": times["wrapped_cache_patterns"] / times["unwrapped"] - 1}
        print(json.dumps(record))
        records.append(record)
    write_results("wrap", records)


if __name__ == "__main__":
    main()
