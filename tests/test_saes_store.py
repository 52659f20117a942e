"""The activation store: shards, stop_at_layer, resuming after a kill, the shuffled reader, the trainer."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CASES, tiny_hf_model
from hooked_attn import HookedTransformer
from hooked_attn.saes.store import ActivationReader, harvest_activations, shard_name, stop_layer_for
from hooked_attn.saes.train import TrainConfig, train_sae

LLAMA = next(cfg for arch, _, cfg in CASES if arch.hf_architecture == "LlamaForCausalLM")
HOOKS = ["blocks.0.hook_resid_post", "blocks.0.attn.hook_z"]
TESTS = Path(__file__).resolve().parent

CHILD = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from conftest import CASES, tiny_hf_model
from hooked_attn import HookedTransformer
from hooked_attn.saes.store import harvest_activations
cfg = next(c for a, _, c in CASES if a.hf_architecture == "LlamaForCausalLM")
model = HookedTransformer.from_pretrained(tiny_hf_model(cfg))
model.add_perma_hook("blocks.0.hook_resid_pre", lambda x, hook: time.sleep(0.4))
tokens = torch.randint(0, cfg.vocab_size, (40, 6), generator=torch.Generator().manual_seed(3))
harvest_activations(model, tokens, {hooks!r}, sys.argv[1], batch_size=2, sequences_per_shard=4, progress=False)
"""


def corpus() -> torch.Tensor:
    return torch.randint(0, LLAMA.vocab_size, (40, 6), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return HookedTransformer.from_pretrained(tiny_hf_model(LLAMA))


def test_shards_hold_every_activation_once(model: HookedTransformer, tmp_path: Path) -> None:
    tokens = corpus()
    harvest_activations(model, tokens, HOOKS, tmp_path, batch_size=3, sequences_per_shard=16, progress=False)
    _, cache = model.run_with_cache(tokens, names_filter=HOOKS)
    shards = [load_file(tmp_path / shard_name(i)) for i in range(3)]
    for hook in HOOKS:
        stored = torch.cat([s[hook] for s in shards])
        expected = cache[hook].reshape(-1, cache[hook].shape[-1]) if hook.endswith("resid_post") else cache[hook].flatten(0, 1)
        torch.testing.assert_close(stored, expected.reshape(stored.shape), atol=1e-6, rtol=1e-5)
    assert stop_layer_for(HOOKS, model.cfg.n_layers) == 1 and stop_layer_for(["ln_final.hook_normalized"], 2) is None


def test_harvest_resumes_after_a_kill(model: HookedTransformer, tmp_path: Path) -> None:
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(TESTS), hooks=HOOKS), str(killed)],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300  # a loaded machine can take a minute to start the child
    while time.monotonic() < deadline and len(list(killed.glob("shard_*.safetensors"))) < 2:
        assert child.poll() is None, child.stderr.read().decode()  # type: ignore[union-attr]
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done = sorted(p.name for p in killed.glob("shard_*.safetensors"))
    assert 2 <= len(done) < 10, done
    harvest_activations(model, corpus(), HOOKS, killed, batch_size=2, sequences_per_shard=4, progress=False)
    harvest_activations(model, corpus(), HOOKS, reference, batch_size=2, sequences_per_shard=4, progress=False)
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in reference.iterdir())
    for i in range(10):
        got, want = load_file(killed / shard_name(i)), load_file(reference / shard_name(i))
        for hook in HOOKS:
            torch.testing.assert_close(got[hook], want[hook], atol=0, rtol=0)
    with pytest.raises(ValueError, match="sequences_per_shard"):
        harvest_activations(model, corpus(), HOOKS, killed, sequences_per_shard=5, progress=False)


def test_reader_serves_every_row_once_per_pass_shuffled(model: HookedTransformer, tmp_path: Path) -> None:
    harvest_activations(model, corpus(), HOOKS[:1], tmp_path, sequences_per_shard=8, progress=False)
    reader = ActivationReader(tmp_path, HOOKS[0], batch_size=7, shards_in_memory=2)
    batches = list(reader)
    rows = torch.cat(batches)
    stored = torch.cat([load_file(tmp_path / shard_name(i))[HOOKS[0]] for i in range(5)])
    assert rows.shape == stored.shape == (reader.n_rows, 32)
    assert not torch.equal(rows, stored)  # shuffled
    key = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
    torch.testing.assert_close(key(rows), key(stored), atol=0, rtol=0)
    assert all(b.shape[0] == 7 for b in batches[:-1])
    with pytest.raises(KeyError, match="hook_mlp_out"):
        ActivationReader(tmp_path, "blocks.0.hook_mlp_out", batch_size=4)


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_trainer_learns_a_sparse_dictionary(arch: str) -> None:
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(48, 16, generator=gen)
    data = (torch.rand(4096, 48, generator=gen) * (torch.rand(4096, 48, generator=gen) < 0.06)) @ basis
    extra = {"k": 4} if arch == "topk" else {"l1_coefficient": 1e-3}
    sae, history = train_sae(list(data.split(256)), TrainConfig(architecture=arch, d_in=16, d_sae=64, n_steps=300,
                                                               lr=1e-2, dead_window=50, **extra))
    assert set(history[0]) == {"step", "loss", "mse", "l0", "explained_variance", "dead_features"}
    final = history[-1]
    # Data built from 48 sparse directions (~3 active per row) is reconstructable by a 64-feature
    # dictionary; a random-init SAE explains about nothing (measured at step 0 below).
    assert history[0]["explained_variance"] < 0.5 < final["explained_variance"]
    assert final["l0"] <= (4 if arch == "topk" else 32)
    assert sae.log_feature_sparsity is not None and sae.log_feature_sparsity.shape == (64,)
