"""Greedy generation of 64 new tokens: hooked_attn's generate (KV cache) against HF's generate, tokens/s.

    python benchmarks/bench_generate.py [--models gpt2-small-shape,smollm2-135m] [--threads 1]

Same prompt (1 x 32 random ids), same model weights, fp32, no sampling, no early stop; the median of a
few runs each, the two sides taken in turn. Measures, never asserts.
"""

import argparse
import json

import torch
import transformers

from benchmarks.common import interleaved, shapes, smollm2_folder, write_results
from hooked_attn import HookedTransformer

NEW_TOKENS, PROMPT = 64, 32


def run(names: list[str], repeats: int = 5) -> list[dict]:
    records = []
    torch.set_grad_enabled(False)
    for name in names:
        if name == "smollm2-135m":
            hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_folder(), attn_implementation="sdpa")
        else:
            torch.manual_seed(0)
            hf = transformers.AutoModelForCausalLM.from_config(shapes()[name], attn_implementation="sdpa")
        hf.eval()
        ours = HookedTransformer.from_pretrained(hf)
        prompt = torch.randint(0, hf.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
        hf_out = hf.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=0)
        our_out = ours.generate(prompt, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
        t = interleaved({
            "hf": lambda: hf.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                      pad_token_id=0),
            "ours": lambda: ours.generate(prompt, max_new_tokens=NEW_TOKENS, stop_at_eos=False),
        }, repeats)
        hf_s, our_s = t["hf"], t["ours"]
        rec = {"op": "generate", "model": name, "dtype": "float32", "prompt": PROMPT, "new_tokens": NEW_TOKENS,
               "hf_tok_s": NEW_TOKENS / hf_s, "hooked_tok_s": NEW_TOKENS / our_s, "hooked_over_hf_tok_s": hf_s / our_s,
               "same_tokens_as_hf": bool(torch.equal(hf_out, our_out))}
        records.append(rec)
        print(json.dumps(rec), flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2-small-shape,smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = run(args.models.split(","), args.repeats)
    write_results("generate", records)


if __name__ == "__main__":
    main()
