"""wrap() overhead: the unwrapped model, the wrapped model with nothing hooked, and caching patterns only.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_wrap [--rounds 21] [--min-run-time 0.3] [--clock thread|wall]
                                                      [--models hf_vit tiny_sdpa ...]

Models with random weights: TabPFN v2 (tabpfn 9.2.0; 2 layers, 200 train + 50 test rows, 8 features),
an HF ViT (4 layers, d_model 128, 64 patches, batch 8, attn_implementation="sdpa") under ``wrap`` and
under ``wrap_hf`` (the fallback, which also watches every module's output), and "tiny_sdpa" (4 layers
of one SDPA call on a [1, 1, 2, 4] input: the forward is almost nothing but the wrapper's own per-call
work, so its extra microseconds are what wrapping adds to any forward with that many call sites).

Measures, never asserts. Each round times every side in turn (the order rotating), each over blocks
filling ``--min-run-time`` (``blocked_autorange``, median of the blocks). A side's figure is the median
over rounds, with the 10th-90th percentile spread. ``unhooked_ratio`` is the median over rounds of
(wrapped, nothing hooked) / (unwrapped) taken within one round. The clock is, by default, the calling
thread's CPU time: with OMP_NUM_THREADS=1 the forward runs on that thread, and on a shared machine
the wall clock mostly measures the other processes (``--clock wall`` for it). Results go to
benchmarks/results/wrap.json.
"""

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers
from torch.utils import benchmark

from benchmarks.common import write_results
from hooked_attn import wrap
from hooked_attn.wrap import wrap_hf


def tabpfn_v2() -> tuple[torch.nn.Module, tuple, dict]:
    from tabpfn.architectures import tabpfn_v2 as v2

    cfg, _ = v2.parse_config({"max_num_classes": 10, "num_buckets": 100, "nlayers": 2, "emsize": 96, "nhead": 4})
    x, y = torch.randn(250, 1, 8), torch.randint(0, 3, (200, 1)).float()
    return v2.get_architecture(cfg).eval(), (x, y), {}


def vit() -> tuple[torch.nn.Module, tuple, dict]:
    cfg = transformers.ViTConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                                 image_size=64, patch_size=8, attn_implementation="sdpa")
    return transformers.ViTModel(cfg).eval(), (), {"pixel_values": torch.randn(8, 3, 64, 64)}


class _SdpaLayer(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(x, x, x)


def tiny_sdpa() -> tuple[torch.nn.Module, tuple, dict]:
    return torch.nn.Sequential(*(_SdpaLayer() for _ in range(4))).eval(), (torch.randn(1, 1, 2, 4),), {}


# name -> (the model and its inputs, how it is wrapped)
MODELS = {"tabpfn_v2": (tabpfn_v2, wrap), "hf_vit": (vit, wrap), "hf_vit_fallback": (vit, wrap_hf),
          "tiny_sdpa": (tiny_sdpa, wrap)}
CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def rounds_of(fns: dict[str, Callable[[], object]], rounds: int, min_run_time: float,
              clock: Callable[[], float]) -> dict[str, list[float]]:
    """Per-round times of each function: every round times all of them, the order rotating."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            timer = benchmark.Timer(stmt="fn()", globals={"fn": fns[name]}, timer=clock)
            times[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--min-run-time", type=float, default=0.3)
    parser.add_argument("--clock", choices=list(CLOCKS), default="thread")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args()
    torch.manual_seed(0)
    records = []
    for name in args.models:
        build, wrapper = MODELS[name]
        model, model_args, kwargs = build()
        wrapped = wrapper(model)
        with torch.no_grad():
            wrapped.discover(*model_args, **kwargs)

            def patterns_only() -> object:
                return wrapped.run_with_cache(*model_args, names_filter=lambda n: n.endswith("hook_pattern"), **kwargs)

            times = rounds_of({
                "unwrapped": lambda: model(*model_args, **kwargs),
                "wrapped_unhooked": lambda: wrapped(*model_args, **kwargs),
                "wrapped_cache_patterns": patterns_only,
            }, rounds=args.rounds, min_run_time=args.min_run_time, clock=CLOCKS[args.clock])
        ratios = [w / u for w, u in zip(times["wrapped_unhooked"], times["unwrapped"], strict=True)]
        cache_ratios = [c / u for c, u in zip(times["wrapped_cache_patterns"], times["unwrapped"], strict=True)]
        record = {"model": name, "attention_calls": len(wrapped.attention_layers), "threads": torch.get_num_threads(),
                  "rounds": args.rounds, "clock": args.clock}
        for side, ts in times.items():
            record |= {f"{side}_s": _percentile(ts, 0.5), f"{side}_p10_s": _percentile(ts, 0.1),
                       f"{side}_p90_s": _percentile(ts, 0.9)}
        record |= {"unhooked_ratio": _percentile(ratios, 0.5), "unhooked_ratio_p10": _percentile(ratios, 0.1),
                   "unhooked_ratio_p90": _percentile(ratios, 0.9),
                   "unhooked_extra_us": 1e6 * (record["wrapped_unhooked_s"] - record["unwrapped_s"]),
                   "cache_patterns_ratio": _percentile(cache_ratios, 0.5)}
        print(json.dumps(record))
        records.append(record)
    write_results("wrap", records)


if __name__ == "__main__":
    main()
