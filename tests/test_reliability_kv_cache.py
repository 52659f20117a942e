"""KV-cache steps are transactions: a forward that fails for any reason leaves the cache as it was, and
the next call gives the logits of one full forward (issue 18 case 2)."""

import pytest
import torch

from _reliability import tiny_llama
from conftest import TOL
from hooked_attn.components.kv_cache import KVCache


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(4, 18, (2, 7), generator=torch.Generator().manual_seed(0))


def state(cache):
    return (cache.n_cached, None if cache.attention_mask is None else cache.attention_mask.clone(),
            [(layer.k, layer.v) for layer in cache.layers])


def assert_same_state(cache, before):
    n, mask, layers = before
    assert cache.n_cached == n
    assert (cache.attention_mask is None) == (mask is None)
    if mask is not None:
        assert torch.equal(cache.attention_mask, mask)
    for layer, (k, v) in zip(cache.layers, layers):
        assert layer.k is k and layer.v is v


def raise_in(exc):
    def hook(x, hook):
        raise exc
    return hook


FAILURES = {
    "refused_id": (lambda m, t, c: m(torch.full_like(t[:, 4:5], 99), past_kv_cache=c), ValueError),
    "hook_raises_in_block_1": (lambda m, t, c: m.run_with_hooks(
        t[:, 4:5], past_kv_cache=c, fwd_hooks=[("blocks.1.attn.hook_z", raise_in(RuntimeError("boom")))]),
        RuntimeError),
    "keyboard_interrupt_in_block_1": (lambda m, t, c: m.run_with_hooks(
        t[:, 4:5], past_kv_cache=c, fwd_hooks=[("blocks.1.hook_mlp_out", raise_in(KeyboardInterrupt()))]),
        KeyboardInterrupt),
    "stop_at_layer": (lambda m, t, c: m(t[:, 4:5], past_kv_cache=c, stop_at_layer=1), None),  # reads, no error
    "start_at_layer": (lambda m, t, c: m(torch.zeros(2, 1, 32), past_kv_cache=c, start_at_layer=1), ValueError),
    "wrong_batch": (lambda m, t, c: m(t[:1, 4:5], past_kv_cache=c), ValueError),
    "additive_mask": (lambda m, t, c: m(t[:, 4:5], past_kv_cache=c, attention_mask=torch.tensor([[0.0], [-1e9]])),
                      ValueError),
    "hook_returns_wrong_shape": (lambda m, t, c: m.run_with_hooks(
        t[:, 4:5], past_kv_cache=c, fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: x[:, :0])]), ValueError),
}


@torch.no_grad()
@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_a_failed_step_leaves_the_cache_as_it_was(model, tokens, failure):
    call, error = FAILURES[failure]
    full = model(tokens)
    cache = KVCache.empty(model.cfg.n_layers)
    first = model(tokens[:, :4], past_kv_cache=cache)
    before = state(cache)
    for _ in range(3):  # several failures in a row change nothing either
        try:
            call(model, tokens, cache)
        except BaseException as err:  # noqa: BLE001 - KeyboardInterrupt is one of the cases
            assert error is None or isinstance(err, error), err
        assert_same_state(cache, before)
    rest = model(tokens[:, 4:], past_kv_cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, **TOL["tiny_fp32"])
    assert model.n_hooks() == 0


@torch.no_grad()
def test_a_padding_only_step_is_allowed_when_the_cache_has_real_tokens(model, tokens):
    cache = KVCache.empty(model.cfg.n_layers)
    model(tokens[:, :4], past_kv_cache=cache)
    model(tokens[:, 4:5], past_kv_cache=cache, attention_mask=torch.tensor([[0], [1]]))
    assert cache.n_cached == 5 and cache.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


@torch.no_grad()
def test_a_cache_for_another_layer_count_is_refused(model, tokens):
    cache = KVCache.empty(1)
    with pytest.raises(ValueError, match=r"past_kv_cache has 1 layers, but the model has 2: make it with "
                                         r"KVCache.empty\(2\)"):
        model(tokens, past_kv_cache=cache)
    assert cache.n_cached == 0 and cache.layers[0].k is None


@torch.no_grad()
def test_an_inconsistent_cache_is_refused(model, tokens):
    cache = KVCache.empty(model.cfg.n_layers)
    model(tokens[:, :3], past_kv_cache=cache)
    cache.layers[1].k = cache.layers[1].k[:, :2]  # edited by hand
    with pytest.raises(ValueError, match=r"past_kv_cache is inconsistent: n_cached=3, but its layers hold \[2, 3\]"):
        model(tokens[:, 3:4], past_kv_cache=cache)


def test_a_cache_step_cannot_start_mid_model():
    model = tiny_llama()
    with pytest.raises(ValueError, match="past_kv_cache needs every layer from block 0 on to run"):
        model(torch.zeros(1, 2, 32), past_kv_cache=KVCache.empty(2), start_at_layer=1)


@torch.no_grad()
def test_a_step_that_stops_early_reads_the_cache_and_leaves_it(model, tokens):
    cache = KVCache.empty(model.cfg.n_layers)
    model(tokens[:, :4], past_kv_cache=cache)
    before = state(cache)
    resid = model(tokens[:, 4:6], past_kv_cache=cache, stop_at_layer=1)
    assert_same_state(cache, before)
    torch.testing.assert_close(resid, model(tokens[:, :6], stop_at_layer=1)[:, 4:6], **TOL["tiny_fp32"])


@torch.no_grad()
def test_a_cache_from_another_model_is_refused_and_left_alone(model, tokens):
    from _reliability import tiny_gpt2

    cache = KVCache.empty(2)
    tiny_gpt2()(tokens[:, :3], past_kv_cache=cache)  # 4 kv heads of 8; the LLaMA has 2 of 8
    before = state(cache)
    with pytest.raises(ValueError, match=r"past_kv_cache holds keys of \(4, 8\) \[kv_head d_head\], but this "
                                         r"model's are \(2, 8\): the cache was made by another model"):
        model(tokens[:, 3:4], past_kv_cache=cache)
    assert_same_state(cache, before)


def test_the_loss_of_a_cached_chunk_scores_the_pairs_inside_it_only():
    """The documented contract (forward docstring, docs/generation.md): with a KV cache the loss
    covers the chunk's own pairs; the boundary pair comes from the previous call's last logits, and
    together they give the full sequence's per-token loss. A one-token chunk has no pair: refused."""
    model = tiny_llama()
    seq = torch.tensor([[2, 4, 5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        full = model(seq, return_type="loss", loss_per_token=True)
        kv = KVCache.empty(model.cfg.n_layers)
        first_logits, first = model(seq[:, :5], past_kv_cache=kv, return_type="both", loss_per_token=True)
        rest = model(seq[:, 5:], past_kv_cache=kv, return_type="loss", loss_per_token=True)
        assert rest.shape == (1, 3)
        boundary = torch.nn.functional.cross_entropy(first_logits[:, -1], seq[:, 5], reduction="none")[:, None]
        torch.testing.assert_close(torch.cat([first, boundary, rest], dim=1), full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(seq[:, 5:], past_kv_cache=KVCache.empty(model.cfg.n_layers),
                                         return_type="loss"), model(seq[:, 5:], return_type="loss"))
        n_before = kv.n_cached
        with pytest.raises(ValueError):
            model(seq[:, :1], past_kv_cache=kv, return_type="loss")
        assert kv.n_cached == n_before
