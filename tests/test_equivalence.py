"""Every registered architecture and variant: the rebuilt model equals the HF model it came from."""

import copy

import pytest
import torch
import transformers

from conftest import (
    FALCON_EAGER_ADDS_ALIBI_TWICE, TOL, random_tokens, randomize_, reference_attn_implementation, tiny_hf_model,
)
from hooked_attn import HookedTransformer

FLAGS = ["fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"]


@torch.no_grad()
@pytest.mark.parametrize("biases", [True, False], ids=["random_biases", "zero_biases"])
def test_unprocessed_logits_and_residuals_match_hf(case, biases):
    arch, _, hf_cfg = case
    hf = tiny_hf_model(hf_cfg, biases=biases)
    tokens = random_tokens(hf_cfg)
    ref = hf(tokens, output_hidden_states=True)
    model = HookedTransformer.from_pretrained_no_processing(hf)
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_pre"))
    torch.testing.assert_close(logits, ref.logits, **TOL["tiny_fp32"])
    torch.testing.assert_close(model(tokens), ref.logits, **TOL["tiny_fp32"])  # fused attention path
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(cache["resid_pre", layer], ref.hidden_states[layer], **TOL["tiny_fp32"])


@torch.no_grad()
@pytest.mark.parametrize("flag", [*FLAGS, "all"])
def test_processed_log_probs_match_hf(case, flag):
    arch, _, hf_cfg = case
    hf = tiny_hf_model(hf_cfg)
    tokens = random_tokens(hf_cfg)
    ref = hf(tokens).logits.log_softmax(-1)
    flags = {f: (flag == "all" or f == flag) for f in FLAGS}
    model = HookedTransformer.from_pretrained(hf, **flags)
    torch.testing.assert_close(model(tokens).log_softmax(-1), ref, **TOL["tiny_fp32"])


@torch.no_grad()
def test_loads_from_a_saved_folder(case, tmp_path):
    arch, _, hf_cfg = case
    hf = tiny_hf_model(hf_cfg)
    hf.save_pretrained(tmp_path)
    tokens = random_tokens(hf_cfg)
    model = HookedTransformer.from_pretrained_no_processing(str(tmp_path))
    # The reference is what HF itself loads from the folder: a config does not always survive the round
    # trip (transformers 4.57's Gemma3TextConfig halves the window of a bidirectional model again on
    # every load), and we must compute what HF computes from the same files.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation=reference_attn_implementation(hf_cfg)).eval()
    torch.testing.assert_close(model(tokens), reloaded(tokens).logits, **TOL["tiny_fp32"])
    assert model.tokenizer is None  # the folder has no tokenizer files


@torch.no_grad()
def test_sdpa_reference_agrees(case):
    """The HF sdpa implementation is what most users run; we match it too."""
    arch, _, hf_cfg = case
    hf = tiny_hf_model(hf_cfg)
    if not type(hf)._supports_sdpa:
        pytest.skip(reason=f"HF's {type(hf).__name__} has no sdpa implementation to compare with")
    tokens = random_tokens(hf_cfg)
    sdpa = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(hf_cfg), attn_implementation="sdpa").eval()
    sdpa.load_state_dict(hf.state_dict())
    model = HookedTransformer.from_pretrained_no_processing(hf)
    reference, sdpa_logits = hf(tokens).logits, sdpa(tokens).logits
    hf_gap = (sdpa_logits - reference).abs().max().item()
    if hf_gap > 1e-3:
        # transformers 4.57's sdpa path drops Gemma 2's soft-capping and GPT-2's scale_attn_weights /
        # scale_attn_by_inverse_layer_idx, so HF disagrees with itself; we are proven against its eager
        # path (conftest.reference_attn_implementation) in every other test.
        pytest.skip(reason=f"transformers {transformers.__version__}: HF sdpa differs from HF's reference "
                           f"implementation by {hf_gap:.2e} on this variant")
    torch.testing.assert_close(model(tokens), sdpa_logits, **TOL["tiny_fp32"])


@torch.no_grad()
def test_bf16_is_as_accurate_as_hf_bf16(case):
    """In bf16 both models round differently; ours must agree with HF's top-1 and be no further
    from the fp32 truth than HF's own bf16 run is (within a small margin)."""
    arch, _, hf_cfg = case
    if getattr(hf_cfg, "num_local_experts", None):
        pytest.skip(reason="routing is discrete: tests/test_moe.py::test_bf16_with_hf_routing covers MoE in bf16")
    hf = tiny_hf_model(hf_cfg)
    tokens = random_tokens(hf_cfg, batch=4, n_pos=16)
    truth = hf(tokens).logits.log_softmax(-1)
    model = HookedTransformer.from_pretrained_no_processing(hf, dtype=torch.bfloat16)
    ref = hf.to(torch.bfloat16)(tokens).logits
    ours = model(tokens)
    assert ours.dtype == torch.bfloat16
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.95, f"top-1 agreement with HF bf16 is {agree:.3f}"
    our_err = (ours.float().log_softmax(-1) - truth).abs().max().item()
    hf_err = (ref.float().log_softmax(-1) - truth).abs().max().item()
    assert our_err <= 1.5 * hf_err + 0.02, f"bf16 error vs fp32: ours {our_err:.4f}, HF's {hf_err:.4f}"


@torch.no_grad()
def test_fused_and_explicit_attention_paths_agree(case):
    """Caching (or hooking) the pattern switches to the explicit attention path; results stay the same."""
    arch, _, hf_cfg = case
    hf = tiny_hf_model(hf_cfg)
    tokens = random_tokens(hf_cfg)
    model = HookedTransformer.from_pretrained_no_processing(hf)
    fused = model(tokens)
    explicit, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    assert len(cache) == model.cfg.n_layers
    torch.testing.assert_close(explicit, fused, **TOL["tiny_fp32"])


@torch.no_grad()
def test_falcon_alibi_hf_eager_adds_the_bias_twice():
    """Why conftest.reference_attn_implementation compares Falcon-with-ALiBi against HF's sdpa
    branch before transformers 5.25: HF's eager branch disagrees with it, and we match sdpa (one bias,
    scaled with the scores, as the original Falcon-RW code). transformers 5.25 fixed its eager branch:
    from then on eager agrees with sdpa and with us, and conftest compares with eager
    (``FALCON_EAGER_ADDS_ALIBI_TWICE`` names the releases this test expects each way)."""
    from hooked_attn.architectures.falcon import tiny_hf_configs

    hf_cfg = tiny_hf_configs()["alibi_mha_sequential_bias"]
    tokens = random_tokens(hf_cfg)
    # One config copy each: transformers 4.57 writes the implementation into the config it is given,
    # and FalconAttention reads it at every call.
    sdpa, eager = (transformers.AutoModelForCausalLM.from_config(copy.deepcopy(hf_cfg), attn_implementation=impl).eval()
                   for impl in ("sdpa", "eager"))
    randomize_(sdpa)
    eager.load_state_dict(sdpa.state_dict())
    sdpa_logits, eager_logits = sdpa(tokens).logits, eager(tokens).logits
    ours = HookedTransformer.from_pretrained_no_processing(sdpa)(tokens)
    torch.testing.assert_close(ours, sdpa_logits, **TOL["tiny_fp32"])
    if FALCON_EAGER_ADDS_ALIBI_TWICE:
        assert (eager_logits - sdpa_logits).abs().max() > 1e-2
    else:
        torch.testing.assert_close(ours, eager_logits, **TOL["tiny_fp32"])


@torch.no_grad()
def test_clip_qkv_hooks_hold_the_clamped_values():
    """hook_q/k/v fire after OLMo's clamp: they hold what attention uses, never beyond clip_qkv."""
    from hooked_attn.architectures.olmo import tiny_hf_configs

    hf_cfg = tiny_hf_configs()["clip_qkv_attention_bias"]
    model = HookedTransformer.from_pretrained_no_processing(tiny_hf_model(hf_cfg))
    clip = model.cfg.clip_qkv
    sites = ("hook_q", "hook_k", "hook_v")
    _, cache = model.run_with_cache(random_tokens(hf_cfg), names_filter=lambda n: n.endswith(sites))
    for name, value in cache.items():
        assert value.abs().max() <= clip, name
        assert (value.abs() == clip).any(), f"{name}: the clamp never binds, so this variant proves nothing"


def test_rotary_fraction_zero_means_no_positions():
    """GPT-NeoX rotary_pct=0: HF rotates an empty slice, so there is no rotary and no rotary hook."""
    from hooked_attn.architectures.gpt_neox import tiny_hf_configs

    model = HookedTransformer.from_pretrained_no_processing(tiny_hf_model(tiny_hf_configs()["no_rotary"]))
    assert model.cfg.positions is None
    assert not any("hook_rot_" in name for name in model.hook_dict)
