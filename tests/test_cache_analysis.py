"""ActivationCache analyses: the invariants that make them trustworthy, on processed tiny models."""

import pytest
import torch

from conftest import random_tokens, tiny_hf_model
from hooked_attn import HookedTransformer
from hooked_attn.architectures.gpt2 import tiny_hf_configs as gpt2_configs
from hooked_attn.architectures.llama import tiny_hf_configs as llama_configs

ATOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(params=["gpt2", "llama"], scope="module")
def run(request):
    cfg = gpt2_configs()["default"] if request.param == "gpt2" else llama_configs()["gqa"]
    model = HookedTransformer.from_pretrained(tiny_hf_model(cfg))  # processed: fold_ln makes DLA exact
    tokens = random_tokens(cfg)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    return model, tokens, logits, cache


def test_accumulated_resid_at_the_end_reproduces_the_logits(run):
    model, _, logits, cache = run
    stack, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert labels[0] == "0_pre" and labels[-1] == "final_post" and len(labels) == model.cfg.n_layers + 1
    assert cache.accumulated_resid(1, incl_mid=True, mlp_input=True, return_labels=True)[1] == [
        "0_pre", "0_mid", "1_pre", "1_mid"]
    torch.testing.assert_close(model.unembed(stack[-1]), logits, **ATOL)
    lens = cache.logit_lens()
    torch.testing.assert_close(lens[-1], logits, **ATOL)
    assert lens.shape == (model.cfg.n_layers + 1, *logits.shape)


@pytest.mark.parametrize("layer", [0, 1, None])
def test_decomposed_components_sum_to_the_residual(run, layer):
    model, _, _, cache = run
    stack, labels = cache.decompose_resid(layer=layer, return_labels=True)
    target = cache.accumulated_resid(layer)[-1]
    if layer is not None:
        torch.testing.assert_close(target, cache["resid_pre", layer])
    torch.testing.assert_close(stack.sum(0), target, **ATOL)
    assert labels[0] == "embed"
    mid = cache.decompose_resid(layer=1, mlp_input=True)
    torch.testing.assert_close(mid.sum(0), cache["resid_mid", 1], **ATOL)


def test_direct_logit_attributions_sum_to_the_logit(run):
    model, tokens, logits, cache = run
    stack = cache.decompose_resid(apply_ln=True)
    next_tokens = tokens[:, 1:]
    attrs = cache.logit_attrs(stack[:, :, :-1], next_tokens)
    expected = logits[:, :-1].gather(-1, next_tokens[..., None])[..., 0] - model.b_U[next_tokens]
    torch.testing.assert_close(attrs.sum(0), expected, **ATOL)
    diff = cache.logit_attrs(stack, 3, incorrect_tokens=5)
    torch.testing.assert_close(diff.sum(0), logits[..., 3] - logits[..., 5] - model.b_U[3] + model.b_U[5], **ATOL)


def test_head_results_from_z_match_hook_result_and_attn_out(run):
    model, tokens, _, cache = run
    heads, labels = cache.stack_head_results(layer=1, return_labels=True)
    assert labels == [f"L0H{h}" for h in range(model.cfg.n_heads)]
    torch.testing.assert_close(heads.sum(0) + model.blocks[0].attn.b_O, cache["attn_out", 0], **ATOL)
    model.set_use_attn_result(True)
    try:
        _, with_result = model.run_with_cache(tokens)
    finally:
        model.set_use_attn_result(False)
    torch.testing.assert_close(with_result.stack_head_results(layer=1), heads, **ATOL)
    full = cache.stack_head_results(incl_remainder=True)
    torch.testing.assert_close(full.sum(0), cache["resid_post", model.cfg.n_layers - 1], **ATOL)


def test_neuron_results_sum_to_mlp_out(run):
    model, _, _, cache = run
    neurons = cache.stack_neuron_results(layer=1)
    assert neurons.shape[0] == model.cfg.d_mlp
    torch.testing.assert_close(neurons.sum(0) + model.blocks[0].mlp.b_out, cache["mlp_out", 0], **ATOL)
    some, labels = cache.stack_neuron_results(layer=1, neuron_slice=[0, 5], pos_slice=-1, return_labels=True)
    assert labels == ["L0N0", "L0N5"] and some.shape == (2, 2, model.cfg.d_model)


def test_pos_slice_and_errors(run):
    model, _, _, cache = run
    assert cache.accumulated_resid(pos_slice=-1).shape == (model.cfg.n_layers + 1, 2, model.cfg.d_model)
    assert cache.accumulated_resid(pos_slice=slice(0, 3)).shape[2] == 3
    with pytest.raises(ValueError, match="layer must be in"):
        cache.accumulated_resid(layer=99)
    _, small = model.run_with_cache(torch.zeros(1, 3, dtype=torch.long), names_filter="hook_embed")
    with pytest.raises(KeyError, match="hook_resid_pre"):
        small.accumulated_resid()


def test_start_and_stop_at_layer_do_only_the_work_they_name(run):
    model, tokens, logits, cache = run
    ran = []
    with model.hooks(fwd_hooks=[(lambda n: n.endswith("hook_resid_pre"), lambda x, hook: ran.append(hook.layer))]):
        resid = model(tokens, stop_at_layer=1)
        assert ran == [0]
        ran.clear()
        out = model(resid, start_at_layer=1)
        assert ran == list(range(1, model.cfg.n_layers))
    torch.testing.assert_close(resid, cache["resid_pre", 1], **ATOL)
    torch.testing.assert_close(out, logits, **ATOL)
    loss = model(resid, start_at_layer=1, tokens=tokens, return_type="loss", loss_per_token=True)
    assert loss.shape == (tokens.shape[0], tokens.shape[1] - 1)
    assert model(tokens, return_type=None) is None
