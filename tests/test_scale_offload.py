"""A model larger than its memory budget runs from a disk offload folder: a child process loads a
~105 MiB random LLaMA from the folder and runs a forward while its resident memory grows by less
than a quarter of the weights (it grows by about one block), and its logits equal the in-memory model's."""

import json
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from hooked_attn import HookedTransformer
from hooked_attn.scale import save_offloaded
from tests.conftest import random_tokens, tiny_hf_model

ROOT = Path(__file__).resolve().parent.parent
# 8 blocks of ~11.6 MB (fp32) and a 8.4 MB embedding and unembedding: ~110 MB of weights.
LLAMA = transformers.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                                 num_key_value_heads=4, vocab_size=4096, max_position_embeddings=128)
WARM_UP = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=4, vocab_size=4096, max_position_embeddings=128)

# Peak resident memory is read from /proc/self/status (VmHWM), reset by writing 5 to clear_refs once
# the code is loaded, so the figure is what the model's data adds. A first offloaded forward loads
# ~40 MB of code (accelerate's hooks import torch._dynamo, kernels initialise): the child runs one on
# a tiny model of the same architecture first.
CHILD = """
import json, sys, torch
from hooked_attn.scale import load_offloaded

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

folder, warm_folder, tokens_file, out = sys.argv[1:5]
tokens = torch.load(tokens_file)
with torch.no_grad():
    load_offloaded(warm_folder)(tokens)
open("/proc/self/clear_refs", "w").write("5")
before = status()["VmRSS"]
model = load_offloaded(folder)
with torch.no_grad():
    logits = model(tokens)
peak = status()["VmHWM"]
torch.save(logits, out + ".pt")
json.dump({"rss_before": before, "peak_rss": peak, "growth": peak - before}, open(out, "w"))
"""


def run_offloaded_child(folder: Path, warm_folder: Path, tokens: torch.Tensor, out: Path) -> dict:
    torch.save(tokens, out.with_suffix(".tokens"))
    args = [str(folder), str(warm_folder), str(out.with_suffix(".tokens")), str(out)]
    done = subprocess.run([sys.executable, "-c", CHILD, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                               "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return {**json.loads(out.read_text()), "logits": torch.load(str(out) + ".pt")}


def test_offloaded_forward_stays_under_a_budget_below_the_weights(tmp_path):
    model = HookedTransformer.from_pretrained(tiny_hf_model(LLAMA))
    weights = sum(p.nbytes for p in model.parameters())
    budget = weights // 4
    tokens = random_tokens(LLAMA, batch=2, n_pos=16)
    with torch.no_grad():
        want = model(tokens)
    save_offloaded(model, tmp_path / "offload")
    del model
    save_offloaded(HookedTransformer.from_pretrained(tiny_hf_model(WARM_UP)), tmp_path / "warm_up")
    got = run_offloaded_child(tmp_path / "offload", tmp_path / "warm_up", tokens, tmp_path / "child.json")
    assert got["growth"] < budget, (f"peak RSS grew by {got['growth'] / 2**20:.1f} MiB, over the budget "
                                    f"{budget / 2**20:.1f} MiB (weights {weights / 2**20:.1f} MiB)")
    torch.testing.assert_close(got["logits"], want, atol=0, rtol=0)
