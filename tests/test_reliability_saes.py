"""SAEs spliced under hostile settings: the error term gives the activation back, bad heads are named."""

import pytest
import torch

from _reliability import tiny_llama
from hooked_attn.saes import SAE, SAEConfig

TOKENS = torch.tensor([[4, 5, 6, 7], [8, 9, 10, 11]])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_lower_precision_sae_with_its_error_term_leaves_the_model_unchanged(dtype):
    """The error was taken in the SAE's dtype, so the model got its activation back rounded to
    float16 (logits off by ~3e-3); now it is taken in the wider dtype: fp32 rounding only."""
    model = tiny_llama()
    clean = model(TOKENS)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(architecture="standard", d_in=32, d_sae=64, hook_name="blocks.0.hook_resid_post", dtype=dtype))
    with torch.no_grad():
        spliced = model.run_with_saes(TOKENS, saes=[sae], use_error_term=True)
    torch.testing.assert_close(spliced, clean, atol=1e-5, rtol=1e-5)
    assert model.acts_to_saes == {} and model.n_hooks() == 0


@pytest.mark.parametrize("head", [4, -5])
def test_a_head_index_outside_the_activation_is_named(head):
    model = tiny_llama()
    clean = model(TOKENS)
    sae = SAE(SAEConfig(architecture="standard", d_in=8, d_sae=16, hook_name="blocks.0.attn.hook_z", hook_head_index=head))
    with pytest.raises(ValueError, match=rf"head index {head} does not fit 'blocks.0.attn.hook_z'.*\(2, 4, 4, 8\)"):
        model.run_with_saes(TOKENS, saes=[sae])
    assert model.acts_to_saes == {} and model.n_hooks() == 0
    torch.testing.assert_close(model(TOKENS), clean)


def _normalizing_sae(norm):
    torch.manual_seed(1)
    sae = SAE(SAEConfig(architecture="standard", d_in=32, d_sae=64, hook_name="blocks.0.hook_resid_post",
                        normalize_activations=norm))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return sae


def _by_hand(sae, x):
    """decode(encode(x)) written out, de-normalized with x's own statistics."""
    if sae.cfg.normalize_activations == "layer_norm":
        mean, std = x.mean(-1, keepdim=True), (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
        normed, undo = (x - mean) / (std + 1e-5), lambda y: y * std + mean
    else:
        scale = 32**0.5 / x.norm(dim=-1, keepdim=True)
        normed, undo = x * scale, lambda y: y / scale
    acts = ((normed - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
    return undo(acts @ sae.W_dec + sae.b_dec)


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale"])
def test_decode_uses_the_statistics_of_its_own_input(norm):
    """decode() de-normalized with the statistics of the most recent encode(): features of x1
    decoded after encode(x2) came back in x2's scale and offset, silently (same shapes)."""
    sae = _normalizing_sae(norm)
    x1, x2 = torch.randn(3, 32) * 5 + 2, torch.randn(3, 32) * 0.1 - 1
    with torch.no_grad():
        f1 = sae.encode(x1)
        sae.encode(x2)
        torch.testing.assert_close(sae.decode(f1), _by_hand(sae, x1))
        f1[:, 0] = 0.0  # an in-place edit keeps the statistics
        sae.decode(f1)
        derived = f1 * 2.0  # a new tensor: which input it came from is unknown, so it is refused
        with pytest.raises(ValueError, match=r"pass norm_stats=sae.norm_stats\(x\)"):
            sae.decode(derived)
        torch.testing.assert_close(sae.decode(derived, norm_stats=sae.norm_stats(x1)),
                                   sae.decode(derived, norm_stats=getattr(f1, "hooked_attn_sae_norm_stats")))
        with pytest.raises(ValueError, match=r"norm_stats must be the pair .* shape \(3, 1\); got \(2, 1\)"):
            sae.decode(derived, norm_stats=sae.norm_stats(x1[:2]))
        torch.testing.assert_close(sae.reconstruct(x1), _by_hand(sae, x1))


def test_an_sae_that_does_not_normalize_decodes_any_features():
    sae = _normalizing_sae("none")
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert sae.norm_stats(x) is None
        torch.testing.assert_close(sae.decode(sae.encode(x) * 1.0), sae.reconstruct(x))


def _transcoder():
    torch.manual_seed(2)
    tc = SAE(SAEConfig(architecture="transcoder", d_in=32, d_sae=64, d_out=32, hook_name="blocks.0.hook_resid_post",
                       hook_name_out="blocks.1.hook_mlp_out", apply_b_dec_to_input=False))
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return tc


def test_a_transcoders_captured_input_never_outlives_its_model_call():
    """A stop_at_layer run that captured the transcoder's input (layer 0) but stopped before its
    output (layer 1) left that input for the next call: a start_at_layer=1 run of another sequence
    used it (logits off by 3.7), and a stop_at_layer call made inside a hook replaced the outer
    call's input with its own."""
    model = tiny_llama()
    model.add_sae(_transcoder())
    a, b = torch.tensor([[4, 5, 6, 7]]), torch.tensor([[8, 9, 10, 11]])
    with torch.no_grad():
        full_a = model(a)
        resid_b = model(b, stop_at_layer=1)
        model(a, stop_at_layer=1)
        with pytest.raises(RuntimeError, match="its input hook did not run"):
            model(resid_b, start_at_layer=1)

        def nested(x, hook):
            model(b, stop_at_layer=1)  # captures b's input in a call of its own

        torch.testing.assert_close(model.run_with_hooks(a, fwd_hooks=[("blocks.1.hook_resid_pre", nested)]), full_a,
                                   rtol=0, atol=0)
        torch.testing.assert_close(model(a), full_a, rtol=0, atol=0)
    model.reset_saes()
    assert model.n_hooks() == 0
