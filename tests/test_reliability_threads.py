"""Temporary hooks belong to the thread and the call that attached them: two threads on one model do not
see each other's hooks, and a model call made inside a hook does not fire (or overwrite) the outer call's
hooks (issue 18 case 4), on HookedTransformer and on wrapped models alike."""

import threading

import pytest
import torch
from torch import nn

from _reliability import tiny_llama
from conftest import TOL
from hooked_attn import wrap


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def run_in_threads(jobs):
    """Run every job at once (started together behind a barrier); re-raise the first error."""
    barrier = threading.Barrier(len(jobs))
    errors = []

    def go(job):
        try:
            barrier.wait()
            job()
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=go, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@torch.no_grad()
def test_run_with_cache_in_two_threads_gets_each_threads_own_activations(model):
    a = torch.randint(4, 18, (1, 6), generator=torch.Generator().manual_seed(0))
    b = torch.randint(4, 18, (1, 6), generator=torch.Generator().manual_seed(1))
    want = {name: model.run_with_cache(t)[1] for name, t in (("a", a), ("b", b))}
    got = {"a": [], "b": []}

    def job(name, tokens):
        def run():
            for _ in range(15):
                got[name].append(model.run_with_cache(tokens)[1])
        return run

    run_in_threads([job("a", a), job("b", b)])
    for name in ("a", "b"):
        for cache in got[name]:
            assert set(cache.keys()) == set(want[name].keys())
            for key in want[name].keys():
                assert torch.equal(cache[key], want[name][key]), (name, key)
    assert model.n_hooks() == 0


@torch.no_grad()
def test_a_plain_forward_is_not_ablated_by_another_threads_temporary_hook(model):
    tokens = torch.randint(4, 18, (2, 6), generator=torch.Generator().manual_seed(2))
    clean = model(tokens)
    inside, plain = threading.Event(), []

    def ablate():
        def zero(x, hook):
            inside.set()
            return torch.zeros_like(x)
        for _ in range(10):
            model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", zero)])

    def forward():
        inside.wait(timeout=30)
        for _ in range(10):
            plain.append(model(tokens))

    run_in_threads([ablate, forward])
    assert len(plain) == 10
    for logits in plain:
        torch.testing.assert_close(logits, clean, atol=0, rtol=0)


@torch.no_grad()
def test_model_wide_hooks_still_fire_in_every_thread(model):
    tokens = torch.randint(4, 18, (1, 4), generator=torch.Generator().manual_seed(3))
    seen = []
    model.add_hook("hook_embed", lambda x, hook: seen.append(threading.get_ident()))
    try:
        run_in_threads([lambda: model(tokens), lambda: model(tokens)])
    finally:
        model.reset_hooks(including_permanent=True)
    assert len(set(seen)) == 2


@torch.no_grad()
def test_calling_the_model_inside_a_hook_does_not_touch_the_outer_cache(model):
    outer_tokens = torch.randint(4, 18, (1, 6), generator=torch.Generator().manual_seed(4))
    inner_tokens = torch.randint(4, 18, (1, 3), generator=torch.Generator().manual_seed(5))
    want = model.run_with_cache(outer_tokens)[1]
    inner = {}

    def call_model(x, hook):
        logits, inner["cache"] = model.run_with_cache(inner_tokens)
        inner["logits"] = logits

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_mid", call_model)]):
        _, outer = model.run_with_cache(outer_tokens)
    for key in want.keys():
        assert torch.equal(outer[key], want[key]), key
    # The outer caching hooks on the scores switch attention to its explicit path: equal within fp32 rounding.
    torch.testing.assert_close(inner["logits"], model(inner_tokens), **TOL["tiny_fp32"])
    assert inner["cache"]["hook_embed"].shape[1] == 3
    assert model.n_hooks() == 0


@torch.no_grad()
def test_check_finite_in_one_thread_does_not_raise_in_another(model):
    tokens = torch.randint(4, 18, (1, 4), generator=torch.Generator().manual_seed(6))
    inside, done = threading.Event(), threading.Event()

    def checking():
        with model.check_finite():
            inside.set()
            done.wait(timeout=30)

    def nan_forward():
        inside.wait(timeout=30)
        try:
            model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: x * float("nan"))])
        finally:
            done.set()

    run_in_threads([checking, nan_forward])
    assert not any(p.checks_finite for p in model.hook_points())


@torch.no_grad()
def test_wrapped_models_keep_hooks_per_thread():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True, dropout=0.0).eval()
    wrapped = wrap(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval())
    x = torch.randn(1, 5, 16)
    clean = wrapped(x)
    inside, plain = threading.Event(), []

    def ablate():
        def zero(p, hook):
            inside.set()
            return torch.zeros_like(p)
        for _ in range(10):
            wrapped.run_with_hooks(x, fwd_hooks=[("layers.0.self_attn.hook_pattern", zero)])

    def forward():
        inside.wait(timeout=30)
        for _ in range(10):
            plain.append(wrapped(x))

    run_in_threads([ablate, forward])
    for out in plain:  # the other thread's pattern hook switches attention to the explicit path: fp32 rounding
        torch.testing.assert_close(out, clean, **TOL["tiny_fp32"])
    assert wrapped.n_hooks() == 0


@torch.no_grad()
def test_reset_hooks_in_another_thread_leaves_a_running_calls_hooks_alone(model):
    tokens = torch.randint(4, 18, (1, 4), generator=torch.Generator().manual_seed(7))
    inside, go, seen = threading.Event(), threading.Event(), []

    def wait(x, hook):
        inside.set()
        go.wait(timeout=30)

    def running():
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", wait),
                                                ("blocks.1.hook_resid_pre", lambda x, hook: seen.append(1))])

    thread = threading.Thread(target=running)
    thread.start()
    inside.wait(timeout=30)
    model.reset_hooks()  # this thread's: removes model-wide hooks, not the other call's temporary ones
    go.set()
    thread.join()
    assert seen == [1] and model.n_hooks() == 0
