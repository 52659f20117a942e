"""An activation-patching sweep: resid_pre patched at every layer and position, one metric per patch.

    python benchmarks/bench_patching.py [--models gpt2-small-shape] [--pos 16] [--threads 1]

hooked_attn's ``get_act_patch_resid_pre`` (which batches patches into few forwards) on a clean/corrupted
pair of random prompts, with a logit-difference metric. The TransformerLens figure for the same sweep
comes from benchmarks/peers/tl_bench.py. Measures, never asserts.
"""

import argparse
import json

import torch
import transformers

from benchmarks.common import median_of_runs, shapes, write_results
from hooked_attn import HookedTransformer
from hooked_attn.patching import get_act_patch_resid_pre


def run(names: list[str], n_pos: int, repeats: int = 3) -> list[dict]:
    records = []
    torch.set_grad_enabled(False)
    for name in names:
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(shapes()[name]).eval()
        model = HookedTransformer.from_pretrained(hf)
        gen = torch.Generator().manual_seed(0)
        clean = torch.randint(0, hf.config.vocab_size, (1, n_pos), generator=gen)
        corrupted = clean.clone()
        corrupted[0, n_pos // 2] = (clean[0, n_pos // 2] + 1) % hf.config.vocab_size
        _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))

        def metric(logits: torch.Tensor) -> torch.Tensor:
            return logits[0, -1, 0] - logits[0, -1, 1]

        seconds = median_of_runs(lambda: get_act_patch_resid_pre(model, corrupted, clean_cache, metric), repeats)
        rec = {"op": "patch_resid_pre", "model": name, "n_layers": model.cfg.n_layers, "pos": n_pos,
               "patches": model.cfg.n_layers * n_pos, "seconds": seconds}
        records.append(rec)
        print(json.dumps(rec), flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2-small-shape")
    parser.add_argument("--pos", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = run(args.models.split(","), args.pos)
    write_results("patching", records)


if __name__ == "__main__":
    main()
