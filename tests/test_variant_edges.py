"""Edges of two variants that the registry-wide tests do not reach: padding in a bidirectional model,
and the residual decomposition refused where the residual stream is normalised in every block."""

import pytest
import torch

from hooked_attn import HookedTransformer
from hooked_attn.architectures import REGISTRY
from tests.conftest import TOL, random_tokens, tiny_hf_model


def _arch(model_type: str):
    return next(arch for arch in REGISTRY.values() if arch.model_type == model_type)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_of_a_bidirectional_model_equal_each_sequence_alone(side):
    hf_cfg = _arch("gemma3_text").tiny_hf_configs()["bidirectional"]
    model = HookedTransformer.from_pretrained_no_processing(tiny_hf_model(hf_cfg))
    assert not model.cfg.causal
    long, short = random_tokens(hf_cfg, batch=1, n_pos=7, seed=3)[0], random_tokens(hf_cfg, batch=1, n_pos=4, seed=4)[0]
    pad = torch.zeros(3, dtype=long.dtype)
    if side == "right":
        tokens = torch.stack([long, torch.cat([short, pad])])
        mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
        real = slice(0, 4)
    else:
        tokens = torch.stack([long, torch.cat([pad, short])])
        mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
        real = slice(3, 7)
    with torch.no_grad():
        batched, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: n.endswith("pattern"))
        torch.testing.assert_close(batched[0], model(long[None])[0], **TOL["tiny_fp32"])
        torch.testing.assert_close(batched[1, real], model(short[None])[0], **TOL["tiny_fp32"])
    pattern = cache["blocks.0.attn.hook_pattern"][1]  # [head q_pos k_pos]
    padding = mask[1] == 0
    assert torch.all(pattern[:, ~padding][:, :, padding] == 0)  # real queries never look at padding
    assert torch.all(pattern[:, ~padding][:, :, ~padding].sum(-1).sub(1).abs() < 1e-5)
    first_real = int((~padding).nonzero()[0])
    assert pattern[:, first_real, first_real + 1:].sum() > 0  # and do look ahead: the model is bidirectional


def test_decompose_resid_is_refused_when_each_block_carries_a_normalised_residual():
    hf_cfg = _arch("bloom").tiny_hf_configs()["residual_post_layernorm"]
    model = HookedTransformer.from_pretrained_no_processing(tiny_hf_model(hf_cfg))
    _, cache = model.run_with_cache(random_tokens(hf_cfg))
    with pytest.raises(ValueError, match="normed_residual.*no additive decomposition"):
        cache.decompose_resid()
    cache.accumulated_resid()  # the residual stream itself is still there to read
