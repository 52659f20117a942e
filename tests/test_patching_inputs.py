"""generic_activation_patch checks its inputs before any forward pass (issue 17 item 4): a bad sweep,
batch size, mask or clean cache is refused with nothing run and no hook left behind."""

import pytest
import torch

from _reliability import tiny_llama
from hooked_attn import patching as P


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama()
    tokens = torch.randint(4, 18, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return model, tokens, cache


def metric(logits):
    return logits[:, -1, 0].mean()


CASES = {
    "a row past the last layer": (dict(index_df=[(0, 1), (2, 1)], index_axis_names=["layer", "pos"]),
                                  r"index row \(2, 1\) does not fit the axes \['layer', 'pos'\] of sizes \[2, 6\]"),
    "a row past the last position": (dict(index_df=[(1, 6)], index_axis_names=["layer", "pos"]),
                                     r"index row \(1, 6\) does not fit"),
    "a row of the wrong length": (dict(index_df=[(1,)], index_axis_names=["layer", "pos"]), "does not fit"),
    "an unknown axis": (dict(index_axis_names=["layer", "position"]), r"unknown index axes \['position'\]"),
    "no layer axis first": (dict(index_axis_names=["pos"]), "the first index axis must be 'layer'"),
    "a zero batch size": (dict(index_axis_names=["layer", "pos"], batch_size=0), "batch_size=0"),
    "a mask of another shape": (dict(index_axis_names=["layer", "pos"], attention_mask=torch.ones(2, 5)),
                                r"attention_mask has shape \(2, 5\), the tokens \(2, 6\)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_sweep_inputs_are_refused_before_any_forward(setup, case):
    model, tokens, cache = setup
    kwargs, message = CASES[case]
    calls = []
    handle = model.embed.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            P.generic_activation_patch(model, tokens, cache, metric, P.layer_pos_patch_setter, "resid_pre",
                                       progress=False, **kwargs)
    finally:
        handle.remove()
    assert calls == [] and model.n_hooks() == 0


def test_a_clean_cache_of_another_batch_is_refused_before_any_forward(setup):
    model, tokens, _ = setup
    with torch.no_grad():
        _, one_row = model.run_with_cache(tokens[:1])
    calls = []
    handle = model.embed.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"the clean cache's blocks.0.hook_resid_pre has batch 1, but "
                                             r"corrupted_tokens has batch 2"):
            P.get_act_patch_resid_pre(model, tokens, one_row, metric, progress=False)
    finally:
        handle.remove()
    assert calls == [] and model.n_hooks() == 0


def test_a_valid_index_table_still_runs(setup):
    model, tokens, cache = setup
    out, rows = P.generic_activation_patch(model, tokens, cache, metric, P.layer_pos_patch_setter, "resid_pre",
                                           index_df=[(0, 1), (1, 5)], index_axis_names=["layer", "pos"],
                                           return_index_df=True, progress=False)
    assert out.shape == (2,) and rows == [(0, 1), (1, 5)]
