"""SAEs and transcoders: SAELens-format folders, splicing into a model, cached features, hygiene.

SAELens itself is checked against in scripts/saelens_interop (a side venv, CI leg 60_saelens.sh).
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import TOL, CASES, random_tokens, tiny_hf_model
from hooked_attn import HookedTransformer, SAE, SAEConfig
from hooked_attn.saes import SAEConfigError

LLAMA = next(cfg for arch, _, cfg in CASES if arch.hf_architecture == "LlamaForCausalLM")


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return HookedTransformer.from_pretrained(tiny_hf_model(LLAMA))


def make_sae(architecture: str = "standard", d_in: int = 32, hook: str = "blocks.0.hook_resid_post",
             seed: int = 0, **kwargs) -> SAE:
    extra = {"k": 4} if architecture == "topk" else {}
    sae = SAE(SAEConfig(architecture=architecture, d_in=d_in, d_sae=4 * d_in, hook_name=hook, **extra, **kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if name == "r_mag" else 0.3))
            if name == "threshold":
                p.abs_()
    return sae


ARCHS = ["standard", "gated", "jumprelu", "topk"]


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_round_trip(arch: str, tmp_path: Path) -> None:
    sae = make_sae(arch)
    sparsity = torch.linspace(-5, 0, sae.cfg.d_sae)
    sae.save_model(tmp_path, log_feature_sparsity=sparsity)
    back = SAE.load_from_disk(tmp_path)
    assert dataclasses.replace(back.cfg, metadata={}) == sae.cfg and back.cfg.metadata["sae_lens_version"] == "6.0.0"
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(back.encode(x), sae.encode(x), atol=0, rtol=0)
    assert (sae.encode(x) > 0).any()
    torch.testing.assert_close(back.log_feature_sparsity, sparsity)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"


def test_load_dtype_override(tmp_path: Path) -> None:
    make_sae().save_model(tmp_path)
    back = SAE.load_from_disk(tmp_path, dtype="bfloat16")
    assert back.W_enc.dtype == torch.bfloat16 and back.cfg.dtype == "bfloat16"


def test_topk_keeps_k_features() -> None:
    acts = make_sae("topk").encode(torch.randn(10, 32))
    assert ((acts > 0).sum(-1) <= 4).all() and ((acts > 0).sum(-1) == 4).any()


def test_unknown_cfg_field_is_refused_by_name(tmp_path: Path) -> None:
    make_sae().save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"finetuning_scaling_factor": True}))
    with pytest.raises(SAEConfigError, match="finetuning_scaling_factor"):
        SAE.load_from_disk(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"normalize_activations": "covariance_whitening"}))
    with pytest.raises(SAEConfigError, match="covariance_whitening"):
        SAE.load_from_disk(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"architecture": "matching_pursuit"}))
    with pytest.raises(SAEConfigError, match="matching_pursuit"):
        SAE.load_from_disk(tmp_path)


def test_weights_that_do_not_fit_the_cfg_are_named(tmp_path: Path) -> None:
    make_sae().save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"architecture": "jumprelu", "d_sae": 100}))
    with pytest.raises(SAEConfigError, match=r"missing threshold.*W_enc has shape \(32, 128\), expected \(32, 100\)"):
        SAE.load_from_disk(tmp_path)


def _hooks_state(model: HookedTransformer) -> tuple:
    return (sorted(model.hook_dict), [type(p).__name__ for p in model.hook_dict.values()], model.n_hooks())


SPLICES = {
    "resid": lambda: make_sae(hook="blocks.0.hook_resid_post"),
    "gated_resid_pre": lambda: make_sae("gated", hook="blocks.1.hook_resid_pre"),
    "hook_z": lambda: make_sae(d_in=32, hook="blocks.1.attn.hook_z", reshape_activations="hook_z"),
    "head_index": lambda: make_sae(d_in=8, hook="blocks.0.attn.hook_z", hook_head_index=2),
    "layer_norm": lambda: make_sae("topk", hook="blocks.0.hook_mlp_out", normalize_activations="layer_norm"),
    "transcoder": lambda: make_sae("transcoder", hook="blocks.1.ln2.hook_normalized", d_out=32,
                                   hook_name_out="blocks.1.hook_mlp_out", apply_b_dec_to_input=False),
}


@pytest.mark.parametrize("kind", list(SPLICES))
def test_error_term_leaves_the_output_unchanged(model: HookedTransformer, kind: str) -> None:
    sae = SPLICES[kind]()
    tokens = random_tokens(LLAMA)
    before = _hooks_state(model)
    clean = model(tokens)
    logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True)
    torch.testing.assert_close(logits, clean, **TOL["tiny_fp32"])
    site = sae.cfg.hook_name_out or sae.cfg.hook_name
    acts = cache[f"{site}.hook_sae_acts_post"]
    assert acts.shape == (*tokens.shape, sae.cfg.d_sae) and (acts > 0).any()
    for suffix in ("hook_sae_input", "hook_sae_recons", "hook_sae_error", "hook_sae_output"):
        assert f"{site}.{suffix}" in cache
    # Without the error term the output changes, by exactly the SAE's reconstruction replacing the activation.
    spliced = model.run_with_saes(tokens, saes=[sae])
    assert (spliced - clean).abs().max() > 1e-3
    assert _hooks_state(model) == before


def test_splice_equals_replacing_the_activation_by_hand(model: HookedTransformer) -> None:
    sae = SPLICES["head_index"]()
    tokens = random_tokens(LLAMA)

    def replace(z: torch.Tensor, hook) -> torch.Tensor:
        z = z.clone()
        z[..., 2, :] = sae.reconstruct(z[..., 2, :])
        return z

    expected = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", replace)])
    torch.testing.assert_close(model.run_with_saes(tokens, saes=[sae]), expected, **TOL["tiny_fp32"])


def test_feature_ablation_with_error_term_moves_output_by_the_decoder_row(model: HookedTransformer) -> None:
    sae = SPLICES["resid"]()
    tokens = random_tokens(LLAMA)
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True)
    feature = int(cache["blocks.0.hook_resid_post.hook_sae_acts_post"].sum((0, 1)).argmax())

    def ablate(acts: torch.Tensor, hook) -> torch.Tensor:
        acts = acts.clone()
        acts[..., feature] = 0
        return acts

    ablated = model.run_with_hooks_with_saes(
        tokens, saes=[sae], use_error_term=True,
        fwd_hooks=[("blocks.0.hook_resid_post.hook_sae_acts_post", ablate)])
    contribution = cache["blocks.0.hook_resid_post.hook_sae_acts_post"][..., feature, None] * sae.W_dec[feature]
    by_hand = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x - contribution)])
    torch.testing.assert_close(ablated, by_hand, **TOL["tiny_fp32"])


def test_add_sae_reset_and_context_restore_what_was_there(model: HookedTransformer) -> None:
    first, second = make_sae(seed=1), make_sae(seed=2)
    tokens = random_tokens(LLAMA)
    before = _hooks_state(model)
    model.add_sae(first)
    try:
        with_first = model(tokens)
        with model.saes([second]):
            assert model.acts_to_saes == {"blocks.0.hook_resid_post": second}
            assert not torch.allclose(model(tokens), with_first)
        assert model.acts_to_saes["blocks.0.hook_resid_post"] is first
        torch.testing.assert_close(model(tokens), with_first, atol=0, rtol=0)
    finally:
        model.reset_saes()
    assert model.acts_to_saes == {} and _hooks_state(model) == before


def test_errors_leave_no_sae_or_hook_attached(model: HookedTransformer) -> None:
    tokens = random_tokens(LLAMA)
    before = _hooks_state(model)

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks_with_saes(tokens, saes=[make_sae()], fwd_hooks=[
            ("blocks.0.hook_resid_post.hook_sae_acts_post", boom)])
    with pytest.raises(ValueError, match="d_in=16"):  # a mis-sized SAE fails in the forward, cleanly
        model.run_with_saes(tokens, saes=[make_sae(d_in=16)])
    with pytest.raises(KeyError, match="blocks.0.hook_resid_psot"):
        model.run_with_saes(tokens, saes=[make_sae(), make_sae(hook="blocks.0.hook_resid_psot")])
    with model.saes([make_sae()]):
        with pytest.raises(ValueError, match="spliced SAE's own hook point"):
            model.run_with_saes(tokens, saes=[make_sae(hook="blocks.0.hook_resid_post.hook_sae_output")])
    assert _hooks_state(model) == before and model.acts_to_saes == {}


def test_user_hooks_at_the_site_see_the_sae_input(model: HookedTransformer) -> None:
    sae = make_sae()
    tokens = random_tokens(LLAMA)
    _, clean = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae], names_filter=lambda n: "resid_post" in n)
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], clean["blocks.0.hook_resid_post"], atol=0, rtol=0)
    torch.testing.assert_close(cache["blocks.0.hook_resid_post.hook_sae_input"], clean["blocks.0.hook_resid_post"],
                               atol=0, rtol=0)


def test_error_term_gradients_reach_features(model: HookedTransformer) -> None:
    sae = make_sae()
    tokens = random_tokens(LLAMA)
    grads = {}
    with model.saes([sae], use_error_term=True):
        model.add_hook("blocks.0.hook_resid_post.hook_sae_acts_post",
                       lambda g, hook: grads.__setitem__("acts", g), dir="bwd")
        try:
            model(tokens)[:, -1, 0].sum().backward()
        finally:
            model.reset_hooks()
    assert grads["acts"].abs().sum() > 0


def test_feature_dla_and_the_rest_sum_to_the_logits() -> None:
    """On the final residual stream with fold_ln, every feature's DLA plus b_dec's and the error's sum
    to the logit (less b_U): the decomposition is exact."""
    from hooked_attn.saes.analysis import feature_dla

    model = HookedTransformer.from_pretrained(tiny_hf_model(LLAMA))  # processed: fold_ln
    sae = make_sae(hook="blocks.1.hook_resid_post", seed=3)
    tokens = random_tokens(LLAMA)
    logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True)
    dla = feature_dla(model, sae, cache, range(sae.cfg.d_sae), tokens).sum(0)
    rest = torch.stack([sae.b_dec.expand_as(cache["blocks.1.hook_resid_post.hook_sae_error"]),
                        cache["blocks.1.hook_resid_post.hook_sae_error"]])
    rest = (cache.apply_ln_to_stack(rest) * model.W_U[:, tokens].permute(1, 2, 0)).sum((0, -1))
    expected = logits.gather(-1, tokens[..., None])[..., 0] - model.b_U[tokens]
    torch.testing.assert_close(dla + rest, expected, atol=1e-4, rtol=1e-4)


def test_top_activating_contexts_match_a_full_scan(model: HookedTransformer) -> None:
    from hooked_attn.saes.analysis import top_activating_contexts

    sae = make_sae(seed=5)
    tokens = torch.randint(0, LLAMA.vocab_size, (11, 6), generator=torch.Generator().manual_seed(4))
    values, where = top_activating_contexts(model, sae, tokens, features=[0, 7, 9], k=3, batch_size=4)
    _, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    acts = cache["blocks.0.hook_resid_post.hook_sae_acts_post"][..., [0, 7, 9]]
    torch.testing.assert_close(values, acts.flatten(0, 1).T.topk(3, dim=1).values)
    for f in range(3):
        for j in range(3):
            seq, pos = where[f, j]
            torch.testing.assert_close(acts[seq, pos, f], values[f, j])  # batches of 4 vs 11: ulp-level


def test_feature_attribution_tracks_real_ablation(model: HookedTransformer) -> None:
    from hooked_attn.saes.analysis import feature_attribution

    sae = make_sae(seed=6)
    with torch.no_grad():
        sae.W_dec.mul_(0.05)  # small features: ablating one is a small step, where first order is accurate
    tokens = random_tokens(LLAMA)[:1]
    metric = lambda logits: logits[0, -1, 3] - logits[0, -1, 5]  # noqa: E731
    estimate = feature_attribution(model, sae, tokens, metric)[0]
    with torch.no_grad():
        base = float(metric(model(tokens)))
    candidates = estimate.abs().flatten().topk(12).indices
    real, approx = [], []
    for flat in candidates.tolist():
        pos, feature = divmod(flat, sae.cfg.d_sae)

        def ablate(acts, hook, pos=pos, feature=feature):
            acts = acts.clone()
            acts[0, pos, feature] = 0
            return acts

        with torch.no_grad():
            logits = model.run_with_hooks_with_saes(tokens, saes=[sae], use_error_term=True, fwd_hooks=[
                ("blocks.0.hook_resid_post.hook_sae_acts_post", ablate)])
        real.append(float(metric(logits)) - base)
        approx.append(float(estimate[pos, feature]))
    real_t, approx_t = torch.tensor(real), torch.tensor(approx)
    # Yardstick: the first-order error is second order in the step; at these sizes it stays within
    # 10% of the largest effect, and the estimates order the effects as ablation does.
    assert (real_t - approx_t).abs().max() <= 0.1 * real_t.abs().max()
    assert torch.corrcoef(torch.stack([real_t, approx_t]))[0, 1] > 0.95


def test_feature_patching_through_generic_activation_patch(model: HookedTransformer) -> None:
    """The existing patching functions take a spliced SAE's feature hook by its full name."""
    from hooked_attn.patching import generic_activation_patch, layer_pos_patch_setter

    sae = make_sae(seed=7)
    clean_tokens, corrupted_tokens = random_tokens(LLAMA, seed=1), random_tokens(LLAMA, seed=2)
    name = "blocks.0.hook_resid_post.hook_sae_acts_post"
    metric = lambda logits: logits[:, -1, 3].mean()  # noqa: E731
    with model.saes([sae], use_error_term=True):
        _, clean_cache = model.run_with_cache(clean_tokens, names_filter=[name])
        swept = generic_activation_patch(model, corrupted_tokens, clean_cache, metric, layer_pos_patch_setter, name,
                                         index_axis_names=["layer", "pos"], index_df=[(0, pos) for pos in range(9)],
                                         progress=False)
        for pos in (0, 4, 8):
            def patch(acts, hook, pos=pos):
                acts = acts.clone()
                acts[:, pos] = clean_cache[name][:, pos]
                return acts

            expected = metric(model.run_with_hooks(corrupted_tokens, fwd_hooks=[(name, patch)]))
            torch.testing.assert_close(swept[pos].float(), expected.detach(), **TOL["tiny_fp32"])
    assert swept.std() > 0
