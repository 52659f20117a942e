"""``TransformerBridge.boot_native``: a small random model from a bridge config, built as a HookedTransformer.

Yardsticks: the model ``HookedTransformer(HookedTransformerConfig(...))`` builds from the same fields
and seed (same parameters, same logits), and the batched cache (a batch-less cache's analyses equal
the matching row of the batched ones).
"""

import pytest
import torch

from tests.conftest import TOL


FIELDS = dict(n_layers=2, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_vocab=32, act_fn="gelu", seed=3)
TOKENS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])


@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_boot_native_builds_the_model_hooked_transformer_builds(tl, norm):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(**FIELDS, normalization_type=norm)
    before = torch.random.get_rng_state()
    model = TransformerBridge.boot_native(cfg)
    assert torch.equal(torch.random.get_rng_state(), before)  # seeded: the caller's random state is kept
    assert cfg.model_name == "custom" and model.cfg.model_name == "native"  # the caller's config is not changed
    reference = tl.HookedTransformer(tl.HookedTransformerConfig(**FIELDS, normalization_type=norm))
    assert model.state_dict().keys() == reference.state_dict().keys()
    for name, param in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], param), name
    torch.testing.assert_close(model(TOKENS), reference(TOKENS), **TOL["tiny_fp32"])
    assert model.cfg.normalization_type == norm and model.cfg.tokenizer_prepends_bos is True


@pytest.mark.parametrize("norm", ["LN", "RMS"])
def test_a_batchless_cache_gives_the_batched_rows(tl, norm):
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_native(FIELDS | {"normalization_type": norm})  # a dict of fields works too
    _, cache = model.run_with_cache(TOKENS)
    row = cache.apply_slice_to_batch_dim(1)
    assert not row.has_batch_dim
    for layer in (1, -1):
        for apply_ln in (False, True):
            batched = cache.accumulated_resid(layer=layer, pos_slice=(1, 3), apply_ln=apply_ln)
            torch.testing.assert_close(row.accumulated_resid(layer=layer, pos_slice=(1, 3), apply_ln=apply_ln),
                                       batched[:, 1], **TOL["tiny_fp32"])
    # layer=-1 is the final residual stream: normalised, it is ln_final's output
    final = cache.accumulated_resid(layer=-1, apply_ln=True)[-1]
    torch.testing.assert_close(final, cache["ln_final.hook_normalized"], **TOL["tiny_fp32"])


def test_boot_native_refuses_what_it_does_not_build(tl):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    with pytest.raises(TypeError, match="TransformerBridgeConfig or a dict"):
        TransformerBridge.boot_native(tl.HookedTransformerConfig(**FIELDS))
    with pytest.raises(ValueError, match="native architecture only"):
        TransformerBridge.boot_native(TransformerBridgeConfig(**FIELDS, architecture="LlamaForCausalLM"))
    with pytest.raises(ValueError, match="'standard' or 'rotary' positions"):
        TransformerBridge.boot_native(TransformerBridgeConfig(**FIELDS, positional_embedding_type="shortformer"))
    with pytest.raises(ValueError, match="does not rebuild"):
        TransformerBridge()
    with pytest.raises(ValueError, match="does not rebuild"):
        TransformerBridge.boot_transformers("gpt2")
    rotary = TransformerBridge.boot_native(TransformerBridgeConfig(**FIELDS, positional_embedding_type="rotary"))
    assert "blocks.0.attn.hook_rot_q" in rotary.hook_dict and "hook_pos_embed" not in rotary.hook_dict
