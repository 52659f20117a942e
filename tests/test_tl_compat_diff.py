"""Differences found by running the same tiny models through TransformerLens 3.9.0 and this layer
(session 6 differential probe); each test pins TransformerLens' behaviour by hand computation."""

import sys

import pytest
import torch

import hooked_attn


@pytest.fixture
def tl():
    saved = {k: v for k, v in sys.modules.items() if k == "transformer_lens" or k.startswith("transformer_lens.")}
    hooked_attn.install_as_transformer_lens()
    import transformer_lens

    yield transformer_lens
    for k in [k for k in sys.modules if k == "transformer_lens" or k.startswith("transformer_lens.")]:
        del sys.modules[k]
    sys.modules.update(saved)


def toy(tl, **kw):
    args = dict(n_layers=2, d_model=16, d_head=4, n_ctx=12, d_vocab=23, d_mlp=32, act_fn="gelu", seed=0) | kw
    return tl.HookedTransformer(tl.HookedTransformerConfig(**args))


def test_one_dimensional_token_ids_are_one_row(tl):
    # TransformerLens adds a batch axis to [pos] ids; this layer refused them.
    model = toy(tl)
    ids = torch.tensor([1, 5, 7, 2])
    row = model(ids[None])
    assert torch.equal(model(ids), row)
    logits, cache = model.run_with_cache(ids)
    assert logits.shape == (1, 4, 23) and cache["blocks.0.hook_resid_pre"].shape == (1, 4, 16)
    assert torch.equal(model.run_with_hooks(ids, fwd_hooks=[]), row)
    expected = torch.nn.functional.cross_entropy(row[0, :-1], ids[1:])
    torch.testing.assert_close(model(ids, return_type="loss"), expected)
    with pytest.raises(ValueError, match="token ids"):
        model(torch.zeros(2, 3, 4, dtype=torch.long))  # other ranks are still refused
