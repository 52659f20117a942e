"""Patching: batched sweeps equal one-at-a-time patching, exact cases hold, path patching reduces to
activation patching where the two coincide, and attribution patching approximates the real thing."""

import pytest
import torch
import transformers

from conftest import randomize_, tiny_hf_model
from hooked_attn import HookedTransformer
from hooked_attn import patching as P
from hooked_attn.architectures.llama import tiny_hf_configs as llama_configs


@pytest.fixture(scope="module")
def setup():
    cfg = llama_configs()["gqa"]
    model = HookedTransformer.from_pretrained(tiny_hf_model(cfg))
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, cfg.vocab_size, (2, 6), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 7) % cfg.vocab_size  # differ at position 2 only
    target = clean[:, -1]

    def metric(logits):
        return logits[torch.arange(logits.shape[0]), -1, target].mean()

    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        clean_value = metric(model(clean)).item()
        corrupted_value = metric(model(corrupted)).item()
    return model, clean, corrupted, clean_cache, metric, clean_value, corrupted_value


def test_resid_pre_patching_exact_cases(setup):
    model, _, corrupted, cache, metric, clean_value, corrupted_value = setup
    result = P.get_act_patch_resid_pre(model, corrupted, cache, metric)
    assert result.shape == (model.cfg.n_layers, 6)
    # Layer 0's residual is the embedding: patching position 2 restores the clean input exactly;
    # every other position is identical in both runs.
    assert result[0, 2] == pytest.approx(clean_value, abs=1e-5)
    for pos in (0, 1, 3, 4, 5):
        assert result[0, pos] == pytest.approx(corrupted_value, abs=1e-5)
    # Before position 2 nothing differs at any layer (causal attention).
    assert torch.allclose(result[:, :2], torch.full_like(result[:, :2], corrupted_value), atol=1e-5)


@pytest.mark.parametrize("sweep", [P.get_act_patch_attn_out, P.get_act_patch_attn_head_out_by_pos,
                                   P.get_act_patch_attn_head_v_all_pos, P.get_act_patch_attn_head_pattern_by_pos])
def test_batched_sweeps_equal_one_variant_per_forward(setup, sweep):
    model, _, corrupted, cache, metric, *_ = setup
    batched = sweep(model, corrupted, cache, metric, progress=False)
    single = sweep(model, corrupted, cache, metric, batch_size=1, progress=False)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_sweep_shapes_follow_the_heads(setup):
    model, _, corrupted, cache, metric, *_ = setup
    c = model.cfg
    assert P.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric).shape == (c.n_layers, c.n_heads)
    assert P.get_act_patch_attn_head_k_by_pos(model, corrupted, cache, metric).shape == (c.n_layers, 6, c.n_kv_heads)
    assert P.get_act_patch_attn_head_pattern_dest_src_pos(model, corrupted, cache, metric, batch_size=64).shape == (
        c.n_layers, c.n_heads, 6, 6)
    every = P.get_act_patch_attn_head_all_pos_every(model, corrupted, cache, metric)
    assert every.shape == (5, c.n_layers, c.n_heads) and torch.isnan(every[2, :, c.n_kv_heads:]).all()
    assert P.get_act_patch_block_every(model, corrupted, cache, metric).shape == (3, c.n_layers, 6)
    with pytest.raises(ValueError, match="unknown index axes"):
        P.generic_activation_patch(model, corrupted, cache, metric, P.layer_pos_patch_setter, "resid_pre",
                                   index_axis_names=["layer", "position"])


def test_patching_leaves_no_hooks(setup):
    model, _, corrupted, cache, metric, *_ = setup
    P.get_act_patch_mlp_out(model, corrupted, cache, metric)
    assert model.n_hooks() == 0


def test_path_patching_equals_activation_patching_in_a_one_layer_model():
    cfg = llama_configs()["mha"]
    cfg.num_hidden_layers = 1
    model = HookedTransformer.from_pretrained(tiny_hf_model(cfg))
    gen = torch.Generator().manual_seed(1)
    orig = torch.randint(0, cfg.vocab_size, (1, 5), generator=gen)
    new = torch.randint(0, cfg.vocab_size, (1, 5), generator=gen)
    metric = lambda logits: logits[0, -1, 3]  # noqa: E731
    _, new_cache = model.run_with_cache(new)
    by_patching = P.get_act_patch_attn_head_out_all_pos(model, orig, new_cache, metric)
    by_path = P.path_patch_senders(model, orig, new, ["blocks.0.hook_resid_post"], metric, progress=False)
    torch.testing.assert_close(by_path, by_patching, atol=1e-5, rtol=1e-5)
    same = P.path_patch(model, orig, orig, [(0, 1)], ["blocks.0.hook_resid_post"], metric)
    assert same == pytest.approx(metric(model(orig)).item(), abs=1e-5)
    assert model.n_hooks() == 0


def _near_linear_model(dtype=torch.float32):
    cfg = llama_configs()["mha"]
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    randomize_(hf, seed=2)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.mul_(0.25)
    model = HookedTransformer.from_pretrained(hf, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    clean = torch.randint(0, cfg.vocab_size, (2, 6), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 1] = (clean[:, 1] + 11) % cfg.vocab_size
    return model, clean, corrupted, (lambda logits: logits[:, -1, 5].mean())


def test_attribution_patching_is_the_first_order_term():
    """Exactly what it claims: the derivative of the metric along (clean - corrupted), checked by
    finite differences in float64 at every residual-stream site."""
    model, clean, corrupted, metric = _near_linear_model(torch.float64)
    _, cache = model.run_with_cache(clean)
    base = metric(model(corrupted)).item()
    attr = P.attribution_patch(model, clean, corrupted, metric, sites=("resid_pre", "mlp_out"))
    eps = 1e-6

    def nudge(act, index, clean_act):
        _, pos = index
        act[:, pos] += eps * (clean_act[:, pos] - act[:, pos])

    for site in ("resid_pre", "mlp_out"):
        moved = P.generic_activation_patch(model, corrupted, cache, metric, nudge, site,
                                           index_axis_names=["layer", "pos"], progress=False)
        torch.testing.assert_close(((moved - base) / eps).double(), attr[site].double(), atol=1e-5, rtol=1e-3)


def test_attribution_patching_tracks_activation_patching():
    """Away from the embeddings (where swapping a token is far from a small change) the estimate
    tracks real activation patching closely in a near-linear model."""
    model, clean, corrupted, metric = _near_linear_model()
    _, cache = model.run_with_cache(clean)
    base = metric(model(corrupted)).item()
    attr = P.attribution_patch(model, clean, corrupted, metric, sites=("z", "attn_out", "mlp_out"))
    real = {"z": P.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric),
            "attn_out": P.get_act_patch_attn_out(model, corrupted, cache, metric),
            "mlp_out": P.get_act_patch_mlp_out(model, corrupted, cache, metric)}
    for site, values in real.items():
        assert attr[site].shape == values.shape
        corr = torch.corrcoef(torch.stack([attr[site].flatten(), (values - base).flatten()]))[0, 1]
        assert corr > 0.95, f"{site}: correlation {corr:.3f}"
    assert model.n_hooks() == 0
