"""SAELens 6.x on hooked_attn, checked with the real package (side venv, scripts/ci_extra/60_saelens.sh).

``hooked_attn.install_as_transformer_lens()`` runs before SAELens is imported (in saelens_on_hooked_attn),
so SAELens' ``HookedSAETransformer``, ``SAE`` and training runner are built on hooked_attn's layer even
where the real transformer-lens is installed beside it. Run this file in a pytest process of its own:
test_saelens_roundtrip.py imports SAELens over the real TransformerLens.
"""

import sys

if "sae_lens" in sys.modules and "saelens_on_hooked_attn" not in sys.modules:
    raise RuntimeError("sae_lens was imported before hooked_attn.install_as_transformer_lens(): run "
                       "test_saelens_on_hooked_attn.py in a pytest process of its own")

import importlib.metadata  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import saelens_on_hooked_attn as lens  # noqa: E402  (installs hooked_attn as transformer_lens, then imports sae_lens)
import sae_lens  # noqa: E402
import torch  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

import hooked_attn  # noqa: E402
from hooked_attn.compat.transformer_lens.HookedTransformer import HookedTransformer as CompatHookedTransformer  # noqa: E402
from hooked_attn.hook_points import HookedRootModule, HookPoint  # noqa: E402

HOOK = lens.HOOK
TOL = dict(atol=1e-4, rtol=1e-4)  # fp32 real checkpoint (STYLE.md's TOL for real weights)
DOCS_PAGE = Path(__file__).resolve().parents[2] / "docs" / "transformerlens.md"


@pytest.fixture(scope="module")
def model():
    return lens.load_model()


@pytest.fixture(scope="module")
def tokens(model):
    _, held_out = lens.paragraphs()
    return torch.stack([model.to_tokens(t, prepend_bos=False)[0, :24] for t in held_out[:2]])


@pytest.fixture(scope="module")
def training(model, tmp_path_factory):
    train_texts, _ = lens.paragraphs()
    out = tmp_path_factory.mktemp("trained_sae")
    return lens.train_sae(model, train_texts, output_path=out), out


def random_sae(d_in: int, hook: str, seed: int = 0, **cfg_kwargs) -> sae_lens.StandardSAE:
    """A StandardSAE whose features fire on some tokens and not others (biases spread around zero)."""
    sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=d_in, d_sae=256, metadata=SAEMetadata(hook_name=hook),
                                                          **cfg_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=gen) / d_in**0.5)
        sae.b_enc.copy_(torch.randn(sae.b_enc.shape, generator=gen))
        sae.W_dec.copy_(torch.randn(sae.W_dec.shape, generator=gen) * 0.05)
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=gen) * 0.1)
    return sae.eval()


def test_saelens_runs_on_hooked_attn_not_on_transformer_lens() -> None:
    import transformer_lens
    from sae_lens.analysis import hooked_sae_transformer

    assert transformer_lens.HookedTransformer is CompatHookedTransformer
    assert Path(transformer_lens.__file__).is_relative_to(Path(hooked_attn.__file__).parent)
    assert hooked_sae_transformer.HookedTransformer is CompatHookedTransformer
    assert issubclass(sae_lens.HookedSAETransformer, hooked_attn.HookedTransformer)
    assert issubclass(sae_lens.SAE, HookedRootModule)
    # The real TransformerLens may be installed here (SAELens depends on it); it must not be what runs.
    installed = [d for d in ("transformer-lens", "transformer_lens") if _installed(d)]
    if installed:
        assert not any(m.__file__ and "site-packages/transformer_lens" in m.__file__
                       for name, m in list(sys.modules.items()) if name.startswith("transformer_lens"))


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_hooked_sae_transformer_is_built_by_its_own_init(model) -> None:
    assert type(model) is sae_lens.HookedSAETransformer
    assert model.acts_to_saes == {}
    assert "blocks.0.mlp.hook_in" in model.hook_dict  # added by HookedSAETransformer.__init__


@pytest.mark.parametrize("which", ["random", "trained"])
def test_run_with_cache_with_saes_caches_the_saes_features(model, tokens, training, which: str) -> None:
    if which == "random":
        sae = random_sae(model.cfg.d_model, HOOK)
    else:
        sae = sae_lens.SAE.load_from_disk(training[1])  # what the runner saved for inference
        assert sae.cfg.metadata.hook_name == HOOK
    with torch.no_grad():
        clean_logits, clean = model.run_with_cache(tokens)
        logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
        resid = clean[HOOK]
        torch.testing.assert_close(cache[f"{HOOK}.hook_sae_input"], resid, **TOL)
        acts = cache[f"{HOOK}.hook_sae_acts_post"]
        torch.testing.assert_close(acts, sae.encode(resid), **TOL)
        fired = (acts > 0).float().mean().item()
        assert 0.0 < fired < 1.0, f"a feature map where {fired:.0%} fire proves nothing"
        torch.testing.assert_close(cache[f"{HOOK}.hook_sae_recons"], sae.decode(acts), **TOL)
        manual = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda x, hook: sae.decode(sae.encode(x)))])
        torch.testing.assert_close(logits, manual, **TOL)
        assert (logits - clean_logits).abs().max() > 1.0, "the splice must change the logits"
    assert model.acts_to_saes == {} and isinstance(model.hook_dict[HOOK], HookPoint)
    torch.testing.assert_close(model(tokens), clean_logits, **TOL)


def test_use_error_term_gives_back_the_clean_logits(model, tokens) -> None:
    sae = random_sae(model.cfg.d_model, HOOK)
    with torch.no_grad():
        clean = model(tokens)
        spliced = model.run_with_saes(tokens, saes=[sae], use_error_term=True)
        torch.testing.assert_close(spliced, clean, **TOL)


@pytest.mark.parametrize("hook", ["blocks.2.hook_attn_out", "blocks.2.mlp.hook_post", "blocks.2.hook_mlp_out",
                                  "blocks.2.ln2.hook_scale"])
def test_run_with_saes_at_other_sites(model, tokens, hook: str) -> None:
    """Without a cache (attention takes its fused path); hook_scale is a site the forward pass checks
    before it calls it, where the SAE wrapper stands in for the HookPoint."""
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens, names_filter=[hook])
        sae = random_sae(clean[hook].shape[-1], hook, seed=5)
        spliced = model.run_with_saes(tokens, saes=[sae])
        manual = model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda x, hook: sae.decode(sae.encode(x)))])
        torch.testing.assert_close(spliced, manual, **TOL)
        assert (spliced - model(tokens)).abs().max() > 1e-2, "the splice must change the logits"


def test_add_sae_stays_until_reset_saes(model, tokens) -> None:
    sae = random_sae(model.cfg.d_model, HOOK, seed=1)
    with torch.no_grad():
        clean = model(tokens)
        model.add_sae(sae)
        try:
            assert model.acts_to_saes == {HOOK: sae}
            _, cache = model.run_with_cache(tokens)
            assert f"{HOOK}.hook_sae_acts_post" in cache
            torch.testing.assert_close(cache[f"{HOOK}.hook_sae_acts_post"], sae.encode(cache[f"{HOOK}.hook_sae_input"]),
                                       **TOL)
        finally:
            model.reset_saes()
        assert model.acts_to_saes == {}
        torch.testing.assert_close(model(tokens), clean, **TOL)


def test_hook_z_sae_splices_per_head_values(model, tokens) -> None:
    hook = "blocks.2.attn.hook_z"
    d_in = model.cfg.n_heads * model.cfg.d_head
    sae = random_sae(d_in, hook, seed=2, reshape_activations="hook_z")
    with torch.no_grad():
        _, clean = model.run_with_cache(tokens, names_filter=[hook])
        logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
        torch.testing.assert_close(cache[f"{hook}.hook_sae_acts_post"], sae.encode(clean[hook]), **TOL)
        manual = model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda z, hook: sae.decode(sae.encode(z)))])
        torch.testing.assert_close(logits, manual, **TOL)


def test_transcoder_reads_ln2_and_writes_mlp_out(model, tokens) -> None:
    hook_in, hook_out = "blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out"
    d = model.cfg.d_model
    tc = sae_lens.Transcoder(sae_lens.TranscoderConfig(
        d_in=d, d_sae=256, d_out=d, apply_b_dec_to_input=False,
        metadata=SAEMetadata(hook_name=hook_in, hook_name_out=hook_out)))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        logits, cache = model.run_with_cache_with_saes(tokens, saes=[tc])
        _, clean = model.run_with_cache(tokens, names_filter=[hook_in])
        torch.testing.assert_close(cache[f"{hook_out}.hook_sae_acts_post"], tc.encode(clean[hook_in]), **TOL)
        captured = {}
        manual = model.run_with_hooks(tokens, fwd_hooks=[
            (hook_in, lambda x, hook: captured.setdefault("x", x)),
            (hook_out, lambda out, hook: tc.decode(tc.encode(captured["x"])))])
        torch.testing.assert_close(logits, manual, **TOL)
    assert not model.hook_dict[hook_in].has_hooks, "the transcoder's input hook must be removed with it"


def test_mlp_hook_in_sees_the_mlp_input(model, tokens) -> None:
    seen = {}
    handle = model.blocks[1].mlp.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.mlp.hook_in"])
    finally:
        handle.remove()
    torch.testing.assert_close(cache["blocks.1.mlp.hook_in"], seen["x"], atol=0, rtol=0)


def test_exclude_special_tokens_bypasses_the_sae_at_bos(model, tokens) -> None:
    sae = random_sae(model.cfg.d_model, HOOK, seed=4)
    bos = model.tokenizer.bos_token_id
    with_bos = torch.cat([torch.full((tokens.shape[0], 1), bos), tokens], dim=1)
    with torch.no_grad():
        _, clean = model.run_with_cache(with_bos, names_filter=[HOOK])
        _, cache = model.run_with_cache_with_saes(with_bos, saes=[sae], exclude_special_tokens=True)
        out = cache[f"{HOOK}.hook_sae_output"]
        torch.testing.assert_close(out[:, 0], clean[HOOK][:, 0], **TOL)
        assert (out[:, 1:] - clean[HOOK][:, 1:]).abs().max() > 1.0


def test_training_runner_trains_on_our_activations(model, training) -> None:
    result, _ = training
    assert result.runner.model is model
    store = result.runner.activations_store
    batch = store.get_batch_tokens()
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=[HOOK])
        torch.testing.assert_close(store.get_activations(batch), cache[HOOK], **TOL)
    losses = result.step_losses
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # Yardstick: measured 34983 -> 5195 (see docs/transformerlens.md); half is far from both noise and the result.
    assert last < 0.5 * first, f"SAELens' training loss went from {first:.0f} to {last:.0f}"
    _, held_out = lens.paragraphs()
    acts = lens.held_out_activations(model, held_out)
    before, after = lens.reconstruction_mse(result.initial_sae, acts), lens.reconstruction_mse(result.sae, acts)
    assert after < 0.5 * before, f"held-out reconstruction MSE went from {before:.0f} to {after:.0f}"


def test_training_runner_loads_our_model_by_itself() -> None:
    """Without override_model= SAELens loads the model: ``HookedTransformer.from_pretrained_no_processing(
    model_name=..., center_writing_weights=False)``, with our layer installed, from a local folder."""
    import transformer_lens

    folder = str(lens.resolve_default_model())
    train_texts, _ = lens.paragraphs()
    cfg = sae_lens.LanguageModelSAERunnerConfig(
        sae=sae_lens.StandardTrainingSAEConfig(d_in=576, d_sae=64),  # 576: SmolLM2-135M's d_model
        model_name=folder, hook_name=HOOK,
        dataset_path="in-memory", is_dataset_tokenized=False, streaming=False, context_size=32,
        store_batch_size_prompts=8, n_batches_in_buffer=4, train_batch_size_tokens=128, training_tokens=128 * 3,
        device="cpu", logger=sae_lens.LoggingConfig(log_to_wandb=False), checkpoint_path=None, output_path=None)
    runner = sae_lens.LanguageModelSAETrainingRunner(cfg, override_dataset=lens.Dataset.from_dict({"text": train_texts}))
    assert type(runner.model) is transformer_lens.HookedTransformer
    reference = hooked_attn.HookedTransformer.from_pretrained_no_processing(folder)
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(runner.model(tokens), reference(tokens), **TOL)
    sae = runner.run()
    assert sae.cfg.metadata.hook_name == HOOK


def test_saelens_evals_run_on_our_model(model, training) -> None:
    result, _ = training
    metrics = lens.evaluate(result.sae, result, model)
    ce = metrics["model_performance_preservation"]
    # The trained SAE keeps more of the model than zero-ablating the residual, less than the model itself.
    assert ce["ce_loss_without_sae"] < ce["ce_loss_with_sae"] < ce["ce_loss_with_ablation"], ce
    assert metrics["reconstruction_quality"]["explained_variance"] > 0.5


def test_docs_example_runs() -> None:
    """The ```python saelens block of docs/transformerlens.md (tests/test_docs.py runs plain ```python
    blocks in the main environment, which has no SAELens; this one runs here)."""
    text = DOCS_PAGE.read_text()
    blocks = re.findall(r"^```python saelens\n(.*?)^```$", text, flags=re.M | re.S)
    assert len(blocks) == 1, f"expected one ```python saelens block in {DOCS_PAGE.name}, found {len(blocks)}"
    exec(compile(blocks[0], f"{DOCS_PAGE.name} (python saelens block)", "exec"), {})
