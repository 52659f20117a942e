"""Each processing function states an invariant; these tests check exactly that sentence, per architecture."""

import logging

import pytest
import torch

from conftest import TOL, assert_at_fp32_noise, random_tokens, tiny_hf_model
from hooked_attn import HookedTransformer
from hooked_attn import processing as P


def unprocessed(case):
    arch, _, hf_cfg = case
    model = HookedTransformer.from_pretrained_no_processing(tiny_hf_model(hf_cfg))
    return model, random_tokens(hf_cfg)


def rebuilt(model: HookedTransformer, sd, cfg) -> HookedTransformer:
    new = HookedTransformer(cfg, tokenizer=model.tokenizer).to(model.dtype)
    new.load_state_dict(sd, strict=True)
    return new


def applicable(step: str, cfg) -> bool:
    """The library's own judgement; a step it wrongly calls applicable fails its invariant below."""
    return P.why_not(step, cfg) is None


INVARIANT = {  # step -> what its docstring promises is unchanged
    "fold_ln": "logits", "center_writing_weights": "logits", "center_unembed": "log_probs",
    "fold_value_biases": "logits", "refactor_factored_attn_matrices": "logits",
}


@torch.no_grad()
@pytest.mark.parametrize("step", list(P.STEPS))
def test_each_step_keeps_its_stated_invariant(case, step):
    """The invariant twice over. In float64 it holds exactly: the step's math is right. In float32 the
    processed model is no further from that fp64 truth than fp32 rounding takes the unprocessed model
    (``assert_at_fp32_noise``): processing adds no error beyond rounding. A fixed fp32 tolerance would
    not do: these tiny models' own fp32 error is ~1e-5 (ten ulps of logits ~8), so two fp32 runs that
    round differently pass or fail a 1e-5 bound by luck of the BLAS path."""
    model, tokens = unprocessed(case)
    if not applicable(step, model.cfg):
        with pytest.raises(P.ProcessingError):
            P.STEPS[step](model.state_dict(), model.cfg)
        return
    assert INVARIANT[step] in P.STEPS[step].__doc__.replace("log-probs", "log_probs")
    flags = {s: s == step for s in P.STEPS}
    sd, cfg = P.process_weights(model.state_dict(), model.cfg, **flags)
    assert getattr(cfg.processing, step)
    model64 = HookedTransformer(model.cfg).to(torch.float64)
    model64.load_state_dict(model.state_dict())  # the same weights, exactly, computed in fp64
    before, after = model(tokens), rebuilt(model, sd, cfg)(tokens)
    truth, after64 = model64(tokens), rebuilt(model64, *P.process_weights(model64.state_dict(), model64.cfg, **flags))(tokens)
    if INVARIANT[step] == "log_probs":
        shift = after64 - truth  # a per-position constant over the vocabulary
        torch.testing.assert_close(shift, shift[..., :1].expand_as(shift), **TOL["exact_fp64"])
        before, after, truth, after64 = (x.log_softmax(-1) for x in (before, after, truth, after64))
    torch.testing.assert_close(after64, truth, **TOL["exact_fp64"])
    assert_at_fp32_noise(after, truth, reference=before)


@torch.no_grad()
@pytest.mark.parametrize("step", list(P.STEPS))
def test_steps_are_pure(case, step):
    model, _ = unprocessed(case)
    if not applicable(step, model.cfg):
        return
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    P.STEPS[step](sd, model.cfg)
    for key, value in model.state_dict().items():
        assert torch.equal(sd[key], value), f"{step} modified its input at {key}"


@torch.no_grad()
def test_what_each_step_produces(case):
    """The structural effect, not just the invariant: folded norms vanish, centred weights have zero mean."""
    model, _ = unprocessed(case)
    sd, cfg = P.process_weights(model.state_dict(), model.cfg)
    done = cfg.processing
    for step in ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"):
        assert getattr(done, step) == (P.why_not(step, model.cfg) is None), step
    if done.fold_ln:
        assert not any(k.endswith((".ln1.w", ".ln2.w", "ln_final.w", ".ln1.b", "ln_final.b")) for k in sd
                       if model.cfg.block_norms != "output")
        assert not cfg.norm.weight and not cfg.norm.bias
        assert cfg.normalization_type in ("LNPre", "RMSPre")
    if done.center_unembed:
        torch.testing.assert_close(sd["unembed.W_U"].mean(-1), torch.zeros(cfg.d_model), atol=1e-6, rtol=0)
    if done.fold_value_biases:
        assert all(torch.all(sd[f"blocks.{i}.attn.b_V"] == 0) for i in range(cfg.n_layers))
    if done.center_writing_weights:
        torch.testing.assert_close(sd["blocks.0.attn.W_O"].mean(-1), torch.zeros_like(sd["blocks.0.attn.W_O"][..., 0]),
                                   atol=1e-6, rtol=0)
    if done.fold_ln and cfg.norm.kind == "layernorm" and cfg.block_norms == "pre":
        torch.testing.assert_close(sd["blocks.0.attn.W_Q"].mean(1), torch.zeros_like(sd["blocks.0.attn.W_Q"][:, 0]),
                                   atol=1e-6, rtol=0)


def test_rmsnorm_skips_center_writing_weights_with_a_logged_reason(caplog):
    from hooked_attn.architectures.llama import tiny_hf_configs

    hf = tiny_hf_model(tiny_hf_configs()["gqa"])
    with caplog.at_level(logging.INFO, logger="hooked_attn.processing"):
        model = HookedTransformer.from_pretrained(hf, center_writing_weights=True)
    assert "skipping center_writing_weights" in caplog.text and "RMSNorm" in caplog.text
    assert not model.cfg.processing.center_writing_weights


@torch.no_grad()
def test_clip_qkv_skips_fold_value_biases_and_still_matches_hf(caplog):
    """OLMo's clip_qkv clamps v after its bias: moving b_V into b_O would change what is clamped,
    so that step is skipped with a logged reason; the steps that keep x W + b (fold_ln, centring) run."""
    from hooked_attn.architectures.olmo import tiny_hf_configs

    hf_cfg = tiny_hf_configs()["clip_qkv_attention_bias"]
    hf = tiny_hf_model(hf_cfg)
    tokens = random_tokens(hf_cfg)
    with caplog.at_level(logging.INFO, logger="hooked_attn.processing"):
        model = HookedTransformer.from_pretrained(hf)
    assert "skipping fold_value_biases" in caplog.text and "clip_qkv" in caplog.text
    done = model.cfg.processing
    assert not done.fold_value_biases and done.fold_ln and done.center_writing_weights and done.center_unembed
    assert model.blocks[0].attn.b_V.abs().max() > 0  # the random value biases stayed where they were
    ref = hf(tokens).logits.log_softmax(-1)
    torch.testing.assert_close(model(tokens).log_softmax(-1), ref, **TOL["tiny_fp32"])
    with pytest.raises(P.ProcessingError, match="clip_qkv"):
        P.fold_value_biases(model.state_dict(), model.cfg)


@torch.no_grad()
def test_fold_ln_moves_a_layernorm_bias_into_the_gate_bias():
    """StableLM: LayerNorm with a bias before a gated MLP. The bias lands in b_gate and b_in."""
    from hooked_attn.architectures.stablelm import tiny_hf_configs

    model, tokens = unprocessed((None, "default", tiny_hf_configs()["default"]))
    raw = model.state_dict()
    assert torch.all(raw["blocks.0.mlp.b_gate"] == 0) and raw["blocks.0.ln2.b"].abs().max() > 0
    sd, cfg = P.process_weights(raw, model.cfg, center_writing_weights=False, center_unembed=False,
                                fold_value_biases=False)
    assert cfg.processing.fold_ln and "blocks.0.ln2.b" not in sd
    expected = raw["blocks.0.ln2.b"] @ raw["blocks.0.mlp.W_gate"]  # b W_gate, then zero bias added
    torch.testing.assert_close(sd["blocks.0.mlp.b_gate"], expected, **TOL["tiny_fp32"])
    torch.testing.assert_close(rebuilt(model, sd, cfg)(tokens), model(tokens), **TOL["tiny_fp32"])


def test_normed_residual_skips_fold_ln_with_a_logged_reason(caplog):
    from hooked_attn.architectures.bloom import tiny_hf_configs

    hf = tiny_hf_model(tiny_hf_configs()["residual_post_layernorm"])
    with caplog.at_level(logging.INFO, logger="hooked_attn.processing"):
        model = HookedTransformer.from_pretrained(hf)
    assert "skipping fold_ln" in caplog.text and "norm's output" in caplog.text
    assert not model.cfg.processing.fold_ln and model.cfg.block_norms == "normed_residual"


def test_refactor_is_refused_on_rotary_models_and_leaves_nothing_built():
    from hooked_attn.architectures.llama import tiny_hf_configs

    hf = tiny_hf_model(tiny_hf_configs()["mha"])
    with pytest.raises(P.ProcessingError, match="rotary"):
        HookedTransformer.from_pretrained(hf, refactor_factored_attn_matrices=True)


@torch.no_grad()
def test_refactor_preserves_qk_and_ov_circuits():
    from hooked_attn.architectures.gpt2 import tiny_hf_configs

    model = HookedTransformer.from_pretrained_no_processing(tiny_hf_model(tiny_hf_configs()["default"]))
    sd, cfg = P.process_weights(model.state_dict(), model.cfg, fold_ln=False, center_writing_weights=False,
                                center_unembed=False, fold_value_biases=False, refactor_factored_attn_matrices=True)
    assert cfg.processing.refactor_factored_attn_matrices and cfg.processing.fold_value_biases
    old, new = model.state_dict(), sd
    for i in range(cfg.n_layers):
        a = f"blocks.{i}.attn"
        qk_old = old[f"{a}.W_Q"] @ old[f"{a}.W_K"].mT
        qk_new = new[f"{a}.W_Q"] @ new[f"{a}.W_K"].mT
        torch.testing.assert_close(qk_new, qk_old, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(new[f"{a}.W_V"] @ new[f"{a}.W_O"], old[f"{a}.W_V"] @ old[f"{a}.W_O"],
                                   atol=1e-5, rtol=1e-5)
        # Balanced: [W_Q; b_Q] and [W_K; b_K] carry the same singular values.
        q = torch.cat([new[f"{a}.W_Q"], new[f"{a}.b_Q"][:, None]], dim=1)
        k = torch.cat([new[f"{a}.W_K"], new[f"{a}.b_K"][:, None]], dim=1)
        torch.testing.assert_close(torch.linalg.svdvals(q), torch.linalg.svdvals(k), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_processing_a_bf16_model_folds_in_fp32():
    from hooked_attn.architectures.llama import tiny_hf_configs

    hf_cfg = tiny_hf_configs()["gqa"]
    hf = tiny_hf_model(hf_cfg)
    tokens = random_tokens(hf_cfg)
    model = HookedTransformer.from_pretrained(hf, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    agree = (model(tokens).argmax(-1) == hf(tokens).logits.argmax(-1)).float().mean()
    assert agree >= 0.9
