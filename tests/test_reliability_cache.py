"""ActivationCache analyses under hostile arguments: each gives the right numbers or a clear error."""

import jaxtyping
import pytest
import torch

from _reliability import tiny_gpt2
from conftest import random_tokens, tiny_hf_model
from hooked_attn import HookedTransformer
from hooked_attn.architectures.gemma2 import tiny_hf_configs as gemma2_configs
from hooked_attn.architectures.gpt_neox import tiny_hf_configs as neox_configs
from hooked_attn.architectures.olmo2 import tiny_hf_configs as olmo2_configs
from hooked_attn.architectures.opt import tiny_hf_configs as opt_configs

ATOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture
def untyped(monkeypatch):
    """Let the library's own checks speak: outside this test suite no jaxtyping check answers first."""
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)


@pytest.fixture(scope="module")
def gpt2_run():
    model = tiny_gpt2()
    tokens = torch.tensor([[4, 5, 6], [7, 8, 9]])
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    return model, tokens, logits, cache


def test_an_unknown_decompose_mode_is_refused(gpt2_run, untyped):
    """It used to return the embeddings alone, as if no block had written anything."""
    _, _, _, cache = gpt2_run
    for mode in ("bogus", "attn_out", "ALL", None):
        with pytest.raises(ValueError, match="mode must be one of 'all', 'attn', 'mlp'"):
            cache.decompose_resid(mode=mode)


def test_a_parallel_blocks_mlp_input_leaves_out_its_own_attention():
    """A parallel block's MLP reads resid_pre: the decomposition used to add that block's attn_out."""
    cfg = neox_configs()["default"]
    model = HookedTransformer.from_pretrained_no_processing(tiny_hf_model(cfg))
    assert model.cfg.parallel_attn_mlp
    with torch.no_grad():
        _, cache = model.run_with_cache(random_tokens(cfg))
    stack, labels = cache.decompose_resid(layer=1, mlp_input=True, return_labels=True)
    assert labels == ["embed", "0_attn_out", "0_mlp_out"]
    torch.testing.assert_close(stack.sum(0), cache["blocks.1.hook_resid_pre"], **ATOL)


@pytest.mark.parametrize("variant", ["default", "logit_cap_only"])
def test_the_logit_lens_applies_the_output_soft_cap(variant):
    """The lens at the end must give the model's own logits; Gemma 2 soft-caps them (off by up to 2.9)."""
    cfg = gemma2_configs()[variant]
    model = HookedTransformer.from_pretrained_no_processing(tiny_hf_model(cfg))
    assert model.cfg.output_logits_soft_cap
    with torch.no_grad():
        logits, cache = model.run_with_cache(random_tokens(cfg))
    torch.testing.assert_close(cache.logit_lens()[-1], logits, **ATOL)


def test_logit_attrs_refuse_ids_that_would_broadcast_against_positions(gpt2_run):
    """[batch] ids against a [component batch pos d_model] stack used to line up with pos."""
    model, _, _, cache = gpt2_run
    stack = cache.decompose_resid(apply_ln=True)[:, :, :2]  # batch 2, pos 2: the ambiguous case
    per_row = torch.tensor([5, 7])
    with pytest.raises(ValueError, match=r"tokens has shape \(2,\).*ids\[:, None\]"):
        cache.logit_attrs(stack, per_row)
    expected = (stack * model.W_U[:, per_row].T[None, :, None, :]).sum(-1)
    torch.testing.assert_close(cache.logit_attrs(stack, per_row[:, None]), expected)
    # One id per row against a stack with the position taken out is not ambiguous.
    last = cache.decompose_resid(apply_ln=True, pos_slice=-1)
    torch.testing.assert_close(cache.logit_attrs(last, per_row), (last * model.W_U[:, per_row].T).sum(-1))


@pytest.mark.parametrize("bad", [-1, 18, torch.tensor([[1.0]])])
def test_logit_attrs_refuse_ids_outside_the_vocabulary(gpt2_run, bad):
    """-1 used to pick the last token's direction silently."""
    _, _, _, cache = gpt2_run
    stack = cache.decompose_resid(apply_ln=True)
    with pytest.raises(ValueError, match="tokens (holds ids outside 0..17|must be token ids)"):
        cache.logit_attrs(stack, bad)
    with pytest.raises(ValueError, match="incorrect_tokens"):
        cache.logit_attrs(stack, 3, incorrect_tokens=bad)


def test_apply_ln_refuses_a_stack_sliced_differently_from_its_scale(gpt2_run):
    _, _, _, cache = gpt2_run
    sliced = cache.decompose_resid(pos_slice=slice(0, 1))
    with pytest.raises(ValueError, match="pass the pos_slice the stack was made with"):
        cache.apply_ln_to_stack(sliced)
    torch.testing.assert_close(cache.apply_ln_to_stack(sliced, pos_slice=slice(0, 1)),
                               cache.decompose_resid(apply_ln=True)[:, :, 0:1])


def test_apply_ln_where_no_norm_reads_the_stream_is_the_identity():
    """A model without a final norm: apply_ln used to ask to cache a hook that does not exist."""
    cfg = opt_configs()["no_final_norm_no_affine"]
    model = HookedTransformer.from_pretrained_no_processing(tiny_hf_model(cfg))
    assert "ln_final.hook_scale" not in model.hook_dict
    with torch.no_grad():
        logits, cache = model.run_with_cache(random_tokens(cfg))
    stack = cache.accumulated_resid(apply_ln=True)
    torch.testing.assert_close(stack, cache.accumulated_resid())
    torch.testing.assert_close(model.unembed(stack[-1]), logits, **ATOL)


def test_head_results_of_a_cache_without_its_batch_dim():
    """It raised a raw einsum error; now it equals the batched cache's, squeezed."""
    model = tiny_gpt2()
    tokens = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        _, batched = model.run_with_cache(tokens)
        _, single = model.run_with_cache(tokens, remove_batch_dim=True)
    stack, labels = single.stack_head_results(return_labels=True, incl_remainder=True, apply_ln=True)
    torch.testing.assert_close(stack, batched.stack_head_results(incl_remainder=True, apply_ln=True)[:, 0])
    assert labels[0] == "L0H0" and labels[-1] == "remainder"


@pytest.mark.parametrize("layer", [True, 1.5, "1"])
def test_a_layer_that_is_not_an_int_is_refused(gpt2_run, untyped, layer):
    """layer=True ran as layer 1, layer=1.5 as 2 blocks."""
    _, _, _, cache = gpt2_run
    with pytest.raises(TypeError, match="layer must be an int"):
        cache.accumulated_resid(layer=layer)


def test_neuron_slice_ids_are_checked_and_labelled(gpt2_run, untyped):
    model, _, _, cache = gpt2_run
    for bad in (5, [0.5], [0, model.cfg.d_mlp], [-model.cfg.d_mlp - 1]):
        with pytest.raises(ValueError, match="neuron_slice"):
            cache.stack_neuron_results(neuron_slice=bad)
    stack, labels = cache.stack_neuron_results(layer=1, neuron_slice=[3, -1], return_labels=True)
    assert labels == ["L0N3", f"L0N{model.cfg.d_mlp - 1}"]
    post, W_out = cache["blocks.0.mlp.hook_post"], model.blocks[0].mlp.W_out
    torch.testing.assert_close(stack[1], post[..., -1, None] * W_out[-1])


@pytest.mark.parametrize(("family", "variant"), [("gemma2", "default"), ("olmo2", "default")])
def test_head_and_neuron_results_pass_through_the_norm_after_their_sublayer(family, variant):
    """Gemma 2 and OLMo 2 normalise each sublayer's output before adding it: the per-head and
    per-neuron stacks were the un-normalised outputs, off by up to 7.6 from what reaches the stream.
    Given the cached scale the norm is linear, so the parts now sum to hook_attn_out / hook_mlp_out
    (these families have no output biases)."""
    configs = gemma2_configs() if family == "gemma2" else olmo2_configs()
    cfg = configs[variant]
    model = HookedTransformer.from_pretrained_no_processing(tiny_hf_model(cfg))
    assert model.cfg.post_norm is not None
    with torch.no_grad():
        _, cache = model.run_with_cache(random_tokens(cfg))
    n_heads = model.cfg.n_heads
    for layer in range(model.cfg.n_layers):
        heads = cache.stack_head_results(layer=layer + 1)[-n_heads:]
        torch.testing.assert_close(heads.sum(0), cache[f"blocks.{layer}.hook_attn_out"], **ATOL)
        neurons = cache.stack_neuron_results(layer=layer + 1)[-model.cfg.d_mlp:]
        torch.testing.assert_close(neurons.sum(0), cache[f"blocks.{layer}.hook_mlp_out"], **ATOL)
    last = cache.stack_neuron_results(pos_slice=-1)[-model.cfg.d_mlp:]  # the scale sliced alike
    torch.testing.assert_close(last.sum(0), cache[f"blocks.{model.cfg.n_layers - 1}.hook_mlp_out"][:, -1], **ATOL)


def test_logit_attrs_refuse_a_pos_slice_on_a_stack_without_positions(gpt2_run):
    """A stack already sliced at pos_slice=-1, sliced again in logit_attrs, lost its last batch row
    instead: the attribution of sequence 1 came back for every sequence's question."""
    _, _, _, cache = gpt2_run
    last = cache.decompose_resid(apply_ln=True, pos_slice=-1)  # [component batch d_model]
    with pytest.raises(ValueError, match="has no pos axis"):
        cache.logit_attrs(last, 3, pos_slice=-1)
    torch.testing.assert_close(cache.logit_attrs(cache.decompose_resid(apply_ln=True), 3, pos_slice=-1),
                               cache.logit_attrs(last, 3))


def test_a_layer_outside_the_model_is_named_as_such():
    """cache["pattern", -3] on a 2-layer model used to report a missing 'blocks.-1.attn.hook_pattern'."""
    model = tiny_gpt2()
    _, cache = model.run_with_cache(torch.tensor([[4, 5, 6]]))
    n = model.cfg.n_layers
    assert torch.equal(cache["pattern", -1], cache["pattern", n - 1])
    assert torch.equal(cache["pattern", -n], cache["pattern", 0])
    for layer in (n, -n - 1, 10 * n):
        with pytest.raises(KeyError, match=rf"layer {layer} of \('pattern', {layer}\) is outside this model's {n} "):
            cache["pattern", layer]
        assert ("pattern", layer) not in cache
