"""torch.compile: the forward traces as one graph with no hooks, equals the eager forward, and hooks
attached after compiling still fire (dynamo re-traces) with the same results as uncompiled.

The checks run in a subprocess: this suite wraps every hooked_attn function in a jaxtyping/beartype
checker at import time (pyproject's addopts), and dynamo cannot trace those wrappers. Users compile the
plain library, so that is what is tested.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r'''
import json, sys
import torch, transformers
sys.path.insert(0, sys.argv[1])
from hooked_attn import HookedTransformer
from tests.conftest import TOL, random_tokens, tiny_hf_model

CONFIGS = {
    "gpt2": transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=101),
    "llama": transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=32),
}
report = {}
torch.set_grad_enabled(False)
for name, hf_cfg in CONFIGS.items():
    torch._dynamo.reset()
    model = HookedTransformer.from_pretrained(tiny_hf_model(hf_cfg))
    tokens = random_tokens(hf_cfg, batch=2, n_pos=7)
    eager = model(tokens)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: any graph break raises
    one_graph = compiled(tokens)

    seen = []
    def ablate_head_0(z, hook):
        seen.append(hook.name)
        z = z.clone()
        z[:, :, 0] = 0.0
        return z
    expected = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", ablate_head_0)])
    seen.clear()
    model.add_hook("blocks.1.attn.hook_z", ablate_head_0)
    try:
        patched = compiled(tokens)
    finally:
        model.reset_hooks()
    after = compiled(tokens)
    logits, cache = compiled.run_with_cache(tokens)  # forwarded to the module itself: runs eagerly
    close = lambda a, b: bool(torch.allclose(a, b, **TOL["tiny_fp32"]))
    report[name] = {
        "one_graph_equals_eager": close(one_graph, eager),
        "hook_fired": seen == ["blocks.1.attn.hook_z"],
        "hooked_equals_run_with_hooks": close(patched, expected),
        "hook_changed_result": not close(patched, eager),
        "hook_removed_back_to_clean": close(after, eager),
        "run_with_cache_works": "blocks.0.attn.hook_pattern" in cache and close(logits, eager),
        "no_hooks_left": not any(p.has_hooks for p in model.hook_dict.values()),
    }
print(json.dumps(report))
'''


@pytest.fixture(scope="module")
def report() -> dict:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(root)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("check", [
    "one_graph_equals_eager", "hook_fired", "hooked_equals_run_with_hooks", "hook_changed_result",
    "hook_removed_back_to_clean", "run_with_cache_works", "no_hooks_left",
])
def test_compiled_forward(report, family, check):
    assert report[family][check], report[family]
