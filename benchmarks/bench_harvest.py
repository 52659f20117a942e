"""Activation-store harvest throughput against a plain forward that caches the same hooks.

    python -m benchmarks.bench_harvest [--threads 2] [--batches 4] [--batch-size 4] [--n-pos 128] [--rounds 3]

Measures, never asserts. Over the same token batches of SmolLM2-135M, it times (in turn, in rotating
rounds, medians kept; benchmarks.common.interleaved):
  * forward: ``run_with_cache(batch, names_filter=hooks)`` for every batch, the whole model, nothing written;
  * harvest: ``harvest_activations`` of the same hooks into a fresh folder (safetensors shards written,
    the model stopped after the last hooked block).
Two hook sets: the residual stream after block 3 (where stop_at_layer skips 26 of 30 blocks) and after
the last block (where it cannot). Records go to benchmarks/results/bench_harvest.json.
"""

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from benchmarks.common import interleaved, smollm2_folder, write_results
from hooked_attn import HookedTransformer
from hooked_attn.saes.store import harvest_activations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--n-pos", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = HookedTransformer.from_pretrained(smollm2_folder())
    n_seq = args.batches * args.batch_size
    tokens = torch.randint(0, model.cfg.d_vocab, (n_seq, args.n_pos), generator=torch.Generator().manual_seed(0))
    n_tokens = tokens.numel()
    records = []
    for hooks in (["blocks.3.hook_resid_post"], [f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]):
        def forward() -> None:
            with torch.no_grad():
                for lo in range(0, n_seq, args.batch_size):
                    model.run_with_cache(tokens[lo:lo + args.batch_size], names_filter=hooks)

        def harvest() -> None:
            folder = Path(tempfile.mkdtemp())
            try:
                harvest_activations(model, tokens, hooks, folder, batch_size=args.batch_size,
                                    sequences_per_shard=n_seq, progress=False)
            finally:
                shutil.rmtree(folder)

        times = interleaved({"forward": forward, "harvest": harvest}, rounds=args.rounds)
        record = {"hooks": hooks, "tokens": n_tokens, "batch_size": args.batch_size, "n_pos": args.n_pos,
                  "forward_tokens_per_s": n_tokens / times["forward"], "harvest_tokens_per_s": n_tokens / times["harvest"],
                  "harvest_over_forward_throughput": times["forward"] / times["harvest"],
                  "forward_s": times["forward"], "harvest_s": times["harvest"]}
        print(record)
        records.append(record)
    write_results("bench_harvest", records)


if __name__ == "__main__":
    main()
