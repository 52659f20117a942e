"""Patching checks the clean cache against the corrupted run (batch, positions, model, setter output)
before it patches, and a site outside the blocks is really patched (issue 18 cases 3 and 7)."""

import pytest
import torch

from _reliability import tiny_gpt2, tiny_llama
from hooked_attn import patching as P


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(4, 18, (2, 6), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 2] = 4 + (clean[:, 2] - 4 + 5) % 14  # differ at position 2 only
    target = clean[:, -1]

    def metric(logits):
        return logits[torch.arange(logits.shape[0]), -1, target].mean()

    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
    return model, clean, corrupted, cache, metric


@torch.no_grad()
@pytest.mark.parametrize("site", ["embed", "hook_embed"])
def test_a_site_before_the_blocks_is_patched_at_every_layer(setup, site):
    model, clean, corrupted, cache, metric = setup
    result = P.generic_activation_patch(model, corrupted, cache, metric, P.layer_pos_patch_setter, site,
                                        index_axis_names=["layer", "pos"], progress=False)
    clean_value, corrupted_value = metric(model(clean)).item(), metric(model(corrupted)).item()
    assert clean_value != pytest.approx(corrupted_value, abs=1e-3)
    for layer in range(model.cfg.n_layers):  # the embedding is the same activation whatever the layer
        assert result[layer, 2].item() == pytest.approx(clean_value, abs=1e-5)
        assert result[layer, 0].item() == pytest.approx(corrupted_value, abs=1e-5)


@torch.no_grad()
def test_a_site_after_the_blocks_is_patched(setup):
    model, clean, corrupted, cache, metric = setup
    result = P.generic_activation_patch(model, corrupted, cache, metric, P.layer_pos_patch_setter,
                                        "ln_final.hook_normalized", index_axis_names=["layer", "pos"], progress=False)
    with torch.no_grad():
        want = model.run_with_hooks(corrupted, fwd_hooks=[("ln_final.hook_normalized", lambda x, hook: torch.cat(
            [x[:, :5], cache["ln_final.hook_normalized"][:, 5:]], dim=1))])
    assert result[1, 5].item() == pytest.approx(metric(want).item(), abs=1e-5)


@torch.no_grad()
def test_a_clean_cache_of_another_batch_or_length_is_refused(setup):
    model, clean, corrupted, _, metric = setup
    _, batch1 = model.run_with_cache(clean[:1])
    # Another batch is refused before any forward (tests/test_patching_inputs.py); another length after the
    # corrupted run's one forward, which gives the shape to compare with.
    with pytest.raises(ValueError, match=r"the clean cache's blocks.0.hook_resid_pre has batch 1, but "
                                         r"corrupted_tokens has batch 2"):
        P.get_act_patch_resid_pre(model, corrupted, batch1, metric, progress=False)
    _, longer = model.run_with_cache(torch.cat([clean, clean[:, :2]], dim=1))
    with pytest.raises(ValueError, match=r"has shape \(2, 8, 32\), but on corrupted_tokens it has shape \(2, 6, 32\)"):
        P.get_act_patch_attn_out(model, corrupted, longer, metric, progress=False)
    assert model.n_hooks() == 0


@torch.no_grad()
def test_a_clean_cache_from_another_model_is_refused(setup):
    model, clean, corrupted, _, metric = setup
    other = tiny_llama(seed=1)
    _, foreign = other.run_with_cache(clean)
    with pytest.raises(ValueError, match="the clean cache was made by another model"):
        P.get_act_patch_resid_pre(model, corrupted, foreign, metric, progress=False)


@torch.no_grad()
def test_a_setter_returning_another_shape_is_refused(setup):
    model, _, corrupted, cache, metric = setup

    def broadcasting_setter(act, index, clean):
        return clean[:1, :, :]  # one row: copy_ would broadcast it over the batch

    with pytest.raises(ValueError, match=r"patch_setter 'broadcasting_setter' returned \(1, 6, 32\) for "
                                         r"blocks.0.hook_resid_pre at index \(0, 0\), but the activation has shape "
                                         r"\(2, 6, 32\)"):
        P.generic_activation_patch(model, corrupted, cache, metric, broadcasting_setter, "resid_pre",
                                   index_axis_names=["layer", "pos"], progress=False)
    assert model.n_hooks() == 0


@torch.no_grad()
def test_path_patching_refuses_mismatched_inputs_and_caches(setup):
    model, clean, corrupted, cache, metric = setup
    with pytest.raises(ValueError, match=r"orig_tokens has shape \(2, 6\) and new_tokens \(1, 6\)"):
        P.path_patch(model, corrupted, clean[:1], [(0, 1)], ["blocks.1.hook_resid_pre"], metric)
    _, batch1 = model.run_with_cache(clean[:1])
    with pytest.raises(ValueError, match=r"has shape \(1, 6, 4, 8\), but on new_tokens it has shape \(2, 6, 4, 8\)"):
        P.path_patch(model, corrupted, clean, [(0, 1)], ["blocks.1.hook_resid_pre"], metric, new_cache=batch1)
    with pytest.raises(ValueError, match=r"orig_tokens has shape \(2, 6\) and new_tokens \(2, 5\)"):
        P.path_patch_senders(model, corrupted, clean[:, :5], ["blocks.1.hook_resid_pre"], metric, progress=False)


def test_attribution_patching_refuses_mismatched_batches(setup):
    model, clean, corrupted, _, metric = setup
    with pytest.raises(ValueError, match=r"clean_tokens has shape \(1, 6\) and corrupted_tokens \(2, 6\)"):
        P.attribution_patch(model, clean[:1], corrupted, metric)


def test_attribution_patching_works_with_frozen_parameters_and_leaves_grads_alone(setup):
    model, clean, corrupted, _, metric = setup
    reference = P.attribution_patch(model, clean, corrupted, metric)
    for p in model.parameters():
        assert p.grad is None
    frozen = tiny_llama()
    frozen.requires_grad_(False)
    result = P.attribution_patch(frozen, clean, corrupted, metric)
    for site, value in reference.items():
        torch.testing.assert_close(result[site], value)
    assert frozen.n_hooks() == 0


@torch.no_grad()
def test_learned_position_sites_are_patched_too():
    model = tiny_gpt2()
    clean = torch.randint(4, 18, (1, 5), generator=torch.Generator().manual_seed(3))
    corrupted = clean.clone()
    corrupted[0, 1] = 4 + (clean[0, 1] - 4 + 3) % 14
    _, cache = model.run_with_cache(clean)

    def metric(logits):
        return logits[0, -1, clean[0, -1]]

    result = P.generic_activation_patch(model, corrupted, cache, metric, P.layer_pos_patch_setter, "embed",
                                        index_axis_names=["layer", "pos"], progress=False)
    assert result[1, 1].item() == pytest.approx(metric(model(clean)).item(), abs=1e-5)


def test_index_df_entries_that_are_not_integers_are_refused(setup):
    """(0, 1.7) was truncated to (0, 1) and patched there without a word."""
    model, _, corrupted, cache, metric = setup
    for row in [(0, 1.7), (1, True)]:
        with pytest.raises(ValueError, match="index_df entries must be integers"):
            P.generic_activation_patch(model, corrupted, cache, metric, P.layer_pos_patch_setter, "resid_pre",
                                       index_axis_names=["layer", "pos"], index_df=[row], progress=False)
    assert model.n_hooks() == 0


@pytest.mark.parametrize("metric", [lambda logits: logits[:, -1, :2].sum(0), lambda logits: logits[:, -1, 3]])
def test_a_metric_that_is_not_one_number_is_named(setup, metric):
    model, _, corrupted, cache, _ = setup
    with pytest.raises(ValueError, match="patching_metric must return one number"):
        P.get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)
    assert model.n_hooks() == 0


@pytest.mark.parametrize(("senders", "receivers", "message"), [
    ([(5, 0)], ["blocks.1.hook_resid_pre"], r"sender head \(5, 0\) is outside the model"),
    ([(-1, 0)], ["blocks.1.hook_resid_pre"], r"sender head \(-1, 0\) is outside the model"),
    ([(0, 4)], ["blocks.1.hook_resid_pre"], r"sender head \(0, 4\) is outside the model"),
    ([(0, 0)], [("blocks.1.attn.hook_k", 2)], r"receiver head 2 of 'blocks.1.attn.hook_k' is outside 0..1"),
])
def test_path_patching_heads_outside_the_model_are_refused(setup, senders, receivers, message):
    """A sender in layer 5 (or -1) of a 2-layer model was never patched: the unpatched metric came back."""
    model, clean, corrupted, _, metric = setup
    with pytest.raises(ValueError, match=message):
        P.path_patch(model, clean, corrupted, senders, receivers, metric)
    assert model.n_hooks() == 0
