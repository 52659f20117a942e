"""Hooks attached while a forward (or run_with_cache's backward) runs, by a hook function or any
other code it calls, are removed when that forward raises (issue 18). Before, a hook that called
``add_hook`` and then failed left a model-wide hook behind that changed every later forward. A
successful forward keeps what its hooks attached, and code in a ``with model.hooks()`` body is the
caller's own: its ``add_hook`` calls are model-wide and stay, as documented."""

import pytest
import torch

from _reliability import tiny_llama

NAME = "blocks.0.hook_resid_post"


class Boom(RuntimeError):
    pass


def _adding_then_failing(model):
    def hook(x, hook):
        model.add_hook(NAME, lambda y, hook: y * 0.0)  # would zero every later forward
        model.blocks[1].hook_resid_pre.add_hook(lambda y, hook: y + 1.0)  # the point's own add_hook
        raise Boom("hook failed")
    return hook


def _check_clean(model, ids, expected):
    assert model.n_hooks() == 0
    torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)


def test_run_with_hooks_that_fails_leaves_no_added_hook():
    model = tiny_llama()
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = model(ids)
    with pytest.raises(Boom):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_pre", _adding_then_failing(model))])
    _check_clean(model, ids, expected)


def test_run_with_cache_that_fails_leaves_no_added_hook():
    model = tiny_llama()
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = model(ids)
    [(point, failing)] = model.add_hook("blocks.0.hook_resid_pre", _adding_then_failing(model))
    with pytest.raises(Boom):
        model.run_with_cache(ids)
    point.remove(failing)  # the one the test attached itself
    _check_clean(model, ids, expected)


def test_a_backward_hook_of_run_with_cache_that_fails_leaves_no_added_hook():
    model = tiny_llama()
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = model(ids)
    [(point, failing)] = model.add_hook("blocks.0.hook_resid_pre", _adding_then_failing(model), dir="bwd")
    with pytest.raises(Boom):
        model.run_with_cache(ids, return_type="loss", incl_bwd=True)
    point.remove(failing)
    model.zero_grad(set_to_none=True)
    _check_clean(model, ids, expected)


def test_a_failing_forward_in_a_hooks_block_removes_what_its_hooks_attached():
    model = tiny_llama()
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = model(ids)
    with pytest.raises(Boom):
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", _adding_then_failing(model))]):
            model(ids)
    _check_clean(model, ids, expected)


def test_a_plain_forward_that_fails_leaves_no_added_hook():
    model = tiny_llama()
    ids = torch.tensor([[1, 2, 3, 4]])
    expected = model(ids)
    failing = _adding_then_failing(model)
    model.add_hook("blocks.0.hook_resid_pre", failing)
    with pytest.raises(Boom):
        model(ids)
    assert model.n_hooks() == 1  # only the one attached before the call
    model.reset_hooks()
    _check_clean(model, ids, expected)


def test_hooks_added_by_a_run_that_succeeds_stay_and_outer_hooks_survive_an_inner_failure():
    """The contract is only about failed runs: a successful run keeps what it attached (as
    TransformerLens), and an inner failure does not remove hooks of the enclosing block."""
    model = tiny_llama()
    ids = torch.tensor([[1, 2, 3, 4]])

    def adder(x, hook):
        model.add_hook(NAME, lambda y, hook: None)
    model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_pre", adder)])
    assert model.n_hooks() == 1
    model.reset_hooks()
    with model.hooks(fwd_hooks=[(NAME, lambda y, hook: None)]):
        model.add_hook(NAME, lambda y, hook: None)
        with pytest.raises(Boom):
            model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_pre", _adding_then_failing(model))])
        assert model.n_hooks() == 2  # the block's hook and the one its body attached
    assert model.n_hooks() == 1  # the body's add_hook is model-wide: it stays
    model.reset_hooks()
