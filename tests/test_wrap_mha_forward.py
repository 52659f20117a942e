"""wrap() on a module that calls ``F.multi_head_attention_forward`` itself (no nn.MultiheadAttention).

torch's function reaches ``scaled_dot_product_attention`` when ``need_weights=False``; that call is
hooked and named after the calling module, as any other SDPA call.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hooked_attn import unwrap, wrap

D_MODEL, N_HEADS = 12, 3
D_HEAD = D_MODEL // N_HEADS


class CallsMhaForward(nn.Module):
    """Self-attention over x, then attention from x to ``memory`` (keys masked by ``padding``), both
    through a direct call of ``F.multi_head_attention_forward`` on sequence-first tensors."""

    def __init__(self, cross: bool = True) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.randn(3 * D_MODEL, D_MODEL) / math.sqrt(D_MODEL))
        self.in_proj_bias = nn.Parameter(0.1 * torch.randn(3 * D_MODEL))
        self.out = nn.Linear(D_MODEL, D_MODEL)
        self.cross = cross

    def attend(self, x: torch.Tensor, source: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        out, weights = F.multi_head_attention_forward(
            x.transpose(0, 1), source.transpose(0, 1), source.transpose(0, 1), D_MODEL, N_HEADS,
            self.in_proj_weight, self.in_proj_bias, None, None, False, 0.0, self.out.weight, self.out.bias,
            training=self.training, key_padding_mask=padding, need_weights=False)
        assert weights is None
        return out.transpose(0, 1)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(x, x, None)
        return x + self.attend(x, memory, padding) if self.cross else x


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([CallsMhaForward() for _ in range(2)])

    def forward(self, x: torch.Tensor, memory: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, memory, padding)
        return x


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True  # the second sequence's last two memory positions are padding
    return torch.randn(2, 5, D_MODEL, generator=g), torch.randn(2, 6, D_MODEL, generator=g), padding


def _heads(t: torch.Tensor) -> torch.Tensor:
    return t.unflatten(-1, (N_HEADS, D_HEAD))  # [batch pos d_model] -> [batch pos head d_head]


def _by_hand(layer: CallsMhaForward, x: torch.Tensor, source: torch.Tensor, padding: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and the pattern of one call, from the module's weights."""
    w_q, w_k, _ = layer.in_proj_weight.chunk(3)
    b_q, b_k, _ = layer.in_proj_bias.chunk(3)
    q, k = _heads(x @ w_q.T + b_q), _heads(source @ w_k.T + b_k)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D_HEAD)
    if padding is not None:
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    return q, k, scores.softmax(-1)


def test_the_sdpa_call_inside_a_direct_multi_head_attention_forward_is_hooked() -> None:
    torch.manual_seed(0)
    model = Stack().eval()
    x, memory, padding = _inputs()
    with torch.no_grad():
        expected = model(x, memory, padding)
        wrapped = wrap(model)
        assert torch.equal(wrapped(x, memory, padding), expected)  # before discovery: the model as it is
        out, cache = wrapped.run_with_cache(x, memory, padding)
        assert torch.equal(out, expected)  # caching reads; torch's own computation gives the output
        assert wrapped.attention_layers == ["layers.0", "layers.0.call_1", "layers.1", "layers.1.call_1"]
        assert torch.equal(wrapped(x, memory, padding), expected)  # nothing attached: the plain model

        hidden = x
        for i, layer in enumerate(model.layers):
            after_self = hidden + layer.attend(hidden, hidden, None)
            for prefix, source, mask, query_in in ((f"layers.{i}", hidden, None, hidden),
                                                   (f"layers.{i}.call_1", memory, padding, after_self)):
                q, k, pattern = _by_hand(layer, query_in, source, mask)
                torch.testing.assert_close(cache[f"{prefix}.hook_q"], q)
                torch.testing.assert_close(cache[f"{prefix}.hook_k"], k)
                torch.testing.assert_close(cache[f"{prefix}.hook_pattern"], pattern)
                # The hooked q and k give the cached pattern by the textbook formula too.
                from_hooks = torch.einsum("bqhd,bkhd->bhqk", cache[f"{prefix}.hook_q"], cache[f"{prefix}.hook_k"])
                from_hooks = from_hooks / math.sqrt(D_HEAD)
                if mask is not None:
                    from_hooks = from_hooks.masked_fill(mask[:, None, None, :], float("-inf"))
                torch.testing.assert_close(cache[f"{prefix}.hook_pattern"], from_hooks.softmax(-1))
            hidden = layer(hidden, memory, padding)
        assert (cache["layers.1.call_1.hook_pattern"][1, :, :, 4:] == 0).all()  # padding keys get nothing


def test_an_edit_of_the_pattern_changes_the_output_as_the_explicit_computation_says() -> None:
    torch.manual_seed(0)
    model = CallsMhaForward(cross=False).eval()
    x, memory, padding = _inputs()
    wrapped = wrap(model)
    w_v, b_v = model.in_proj_weight.chunk(3)[2], model.in_proj_bias.chunk(3)[2]

    def reverse_keys(pattern: torch.Tensor, hook: object) -> torch.Tensor:
        return pattern.flip(-1)  # still rows of sum 1, now weighting the keys backwards

    with torch.no_grad():
        plain = model(x, memory, padding)
        edited = wrapped.run_with_hooks(x, memory, padding, fwd_hooks=[("hook_pattern", reverse_keys)])
        pattern = _by_hand(model, x, x, None)[2]
        v = _heads(x @ w_v.T + b_v)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern.flip(-1), v)
        torch.testing.assert_close(edited, x + model.out(z.flatten(-2)))
        assert not torch.allclose(edited, plain, atol=1e-3)
        assert torch.equal(wrapped(x, memory, padding), plain)  # the hook is gone again
    assert wrapped.n_hooks() == 0


class WithWeights(nn.Module):
    """One direct ``F.multi_head_attention_forward`` call with torch's default ``need_weights=True``,
    from ``x`` to ``source``, sequence-first; returns the output and torch's weights."""

    def __init__(self, average: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.inner = CallsMhaForward(cross=False)
        self.average, self.dropout = average, dropout

    def forward(self, x: torch.Tensor, source: torch.Tensor, padding: torch.Tensor, attn_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        inner = self.inner
        out, weights = F.multi_head_attention_forward(
            x.transpose(0, 1), source.transpose(0, 1), source.transpose(0, 1), D_MODEL, N_HEADS,
            inner.in_proj_weight, inner.in_proj_bias, None, None, False, self.dropout, inner.out.weight,
            inner.out.bias, training=self.training, key_padding_mask=padding, attn_mask=attn_mask,
            average_attn_weights=self.average)
        return out.transpose(0, 1), weights


def _masks(mask: str) -> torch.Tensor:
    """A [q_pos k_pos] attn_mask for 5 queries and 6 keys, in torch's convention (bool True = may not attend)."""
    g = torch.Generator().manual_seed(4)
    if mask == "bool":
        forbidden = torch.rand(5, 6, generator=g) < 0.3
        forbidden[:, 0] = False
        return forbidden
    return torch.randn(5, 6, generator=g)


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("mask", ["bool", "float"])
def test_need_weights_true_calls_are_hooked_and_equal_torchs_weights(average: bool, mask: str) -> None:
    torch.manual_seed(0)
    model = WithWeights(average).eval()
    x, memory, padding = _inputs()
    attn_mask = _masks(mask)
    # torch wants both masks of one kind: a float padding mask with a float attn_mask
    kpm = padding if mask == "bool" else torch.zeros(padding.shape).masked_fill(padding, float("-inf"))
    args = (x, memory, kpm, attn_mask)
    with torch.no_grad():
        expected, expected_weights = model(*args)
        wrapped = wrap(model)
        (out, weights), cache = wrapped.run_with_cache(*args)
        assert wrapped.attention_layers == [""]  # the call is made by the root module
        # Read-only hooks: torch's own weights path gives output and weights, bit for bit.
        assert torch.equal(out, expected) and torch.equal(weights, expected_weights)
        pattern = cache["hook_pattern"]  # [batch head q_pos k_pos]
        torch.testing.assert_close(pattern.mean(1) if average else pattern, expected_weights)
        q, k, by_hand = _by_hand(model.inner, x, memory, padding)
        additive = attn_mask.float().masked_fill(attn_mask, float("-inf")) if mask == "bool" else attn_mask
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D_HEAD) + additive
        by_hand = scores.masked_fill(padding[:, None, None, :], float("-inf")).softmax(-1)
        torch.testing.assert_close(pattern, by_hand)
        w_o, b_o = model.inner.out.weight, model.inner.out.bias
        torch.testing.assert_close(F.linear(cache["hook_z"].flatten(-2), w_o, b_o), expected)

        def reverse_keys(pattern: torch.Tensor, hook: object) -> torch.Tensor:
            return pattern.flip(-1)

        edited, edited_weights = wrapped.run_with_hooks(*args, fwd_hooks=[("hook_pattern", reverse_keys)])
        v = _heads(memory @ model.inner.in_proj_weight.chunk(3)[2].T + model.inner.in_proj_bias.chunk(3)[2])
        z = torch.einsum("bhqk,bkhd->bqhd", by_hand.flip(-1), v)
        torch.testing.assert_close(edited, F.linear(z.flatten(-2), w_o, b_o))
        torch.testing.assert_close(edited_weights, by_hand.flip(-1).mean(1) if average else by_hand.flip(-1))
        assert not torch.allclose(edited, expected, atol=1e-3)
        assert torch.equal(wrapped(*args)[0], expected) and wrapped.n_hooks() == 0


@pytest.mark.parametrize("average", [True, False])
def test_a_multihead_module_with_need_weights_shows_torchs_weights_in_its_hooks(average: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D_MODEL, N_HEADS, kdim=7, vdim=5).eval()  # sequence-first, separate projections
    x, source, value = torch.randn(5, 2, D_MODEL), torch.randn(6, 2, 7), torch.randn(6, 2, 5)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, 3:] = True
    with torch.no_grad():
        expected, expected_weights = mha(x, source, value, key_padding_mask=padding, average_attn_weights=average)
        wrapped = wrap(mha)
        (out, weights), cache = wrapped.run_with_cache(x, source, value, key_padding_mask=padding,
                                                       average_attn_weights=average)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(cache["hook_pattern"].mean(1) if average else cache["hook_pattern"], expected_weights)
    recomputed = F.linear(cache["hook_z"].flatten(-2), mha.out_proj.weight, mha.out_proj.bias)
    torch.testing.assert_close(recomputed.transpose(0, 1), expected)


class ScaledQuery(nn.MultiheadAttention):
    """A subclass with a forward of its own (it scales the query) that calls torch's forward."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: object):
        return super().forward(2.0 * query, key, value, **kwargs)


class Reimplemented(nn.MultiheadAttention):
    """A subclass whose forward never reaches torch's attention functions."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: object):
        return self.out_proj(value), None


def _subclass_by_hand(mha: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pattern and v of ScaledQuery self-attention on batch-first x, from its weights."""
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    q, k, v = _heads(2.0 * x @ w_q.T + b_q), _heads(x @ w_k.T + b_k), _heads(x @ w_v.T + b_v)
    return (torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D_HEAD)).softmax(-1), v


def test_a_subclass_with_its_own_forward_stays_and_its_torch_calls_are_hooked(caplog) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D_MODEL, N_HEADS, 24, dropout=0.0, batch_first=True)
    layer.self_attn = ScaledQuery(D_MODEL, N_HEADS, batch_first=True)  # called with need_weights=False
    model = nn.ModuleDict({"encoder": nn.TransformerEncoder(layer, 1, enable_nested_tensor=False),
                           "pool": ScaledQuery(D_MODEL, N_HEADS, batch_first=True),  # need_weights=True
                           "other": Reimplemented(D_MODEL, N_HEADS, batch_first=True)}).eval()

    class Run(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.model["encoder"](x)
            out, weights = self.model["pool"](h, h, h, average_attn_weights=False)
            return self.model["other"](out, out, out)[0], weights

    run = Run()
    x = torch.randn(2, 5, D_MODEL)
    with torch.no_grad():
        expected, expected_weights = run(x)
        wrapped = wrap(run)
        assert type(model["pool"]) is ScaledQuery  # left in place
        (out, weights), cache = wrapped.run_with_cache(x)
        assert wrapped.attention_layers == ["model.encoder.layers.0.self_attn", "model.pool"]
        assert "'model.other'" in caplog.text and "no attention hooks" in caplog.text
        # Unwrapped, no_grad eval lets torch fuse the encoder layer; caching runs torch's ordinary path.
        torch.testing.assert_close(out, expected)
        assert torch.equal(weights, expected_weights)  # torch's own weights path, hooks reading beside it
        h = model["encoder"](x)
        pattern, v = _subclass_by_hand(model["pool"], h)
        torch.testing.assert_close(cache["model.pool.hook_pattern"], pattern)
        torch.testing.assert_close(cache["model.pool.hook_pattern"], expected_weights)
        pattern_0, _ = _subclass_by_hand(model["encoder"].layers[0].self_attn, x)
        torch.testing.assert_close(cache["model.encoder.layers.0.self_attn.hook_pattern"], pattern_0)

        def reverse_keys(p: torch.Tensor, hook: object) -> torch.Tensor:
            return p.flip(-1)

        edited, edited_weights = wrapped.run_with_hooks(x, fwd_hooks=[("model.pool.hook_pattern", reverse_keys)])
        z = torch.einsum("bhqk,bkhd->bqhd", pattern.flip(-1), v)
        pooled = model["pool"].out_proj(z.flatten(-2))
        torch.testing.assert_close(edited, model["other"].out_proj(pooled))
        torch.testing.assert_close(edited_weights, pattern.flip(-1))
    assert unwrap(wrapped) is run and type(model["pool"]) is ScaledQuery


def test_need_weights_true_with_dropout_returns_the_dropped_pattern_its_output_used() -> None:
    torch.manual_seed(0)
    model = WithWeights(average=False, dropout=0.5).train()
    x, memory, padding = _inputs()
    wrapped = wrap(model)
    (out, weights), cache = wrapped.run_with_cache(x, memory, padding, None)
    pattern, z = cache["hook_pattern"], cache["hook_z"]  # the pattern before dropout, z after it
    kept = weights != 0
    assert 0.3 < kept[pattern != 0].float().mean() < 0.7
    torch.testing.assert_close(weights[kept], 2.0 * pattern[kept])  # survivors scaled by 1 / (1 - p)
    v = _heads(memory @ model.inner.in_proj_weight.chunk(3)[2].T + model.inner.in_proj_bias.chunk(3)[2])
    torch.testing.assert_close(z, torch.einsum("bhqk,bkhd->bqhd", weights, v))
    torch.testing.assert_close(out, model.inner.out(z.flatten(-2)))


def _torch_options() -> dict[str, tuple[tuple[torch.Tensor, ...], dict]]:
    """(query, key, value) and keyword arguments of F.multi_head_attention_forward, one per option it has."""
    g = torch.Generator().manual_seed(5)
    e, n, n_q, n_k = D_MODEL, 3, 4, 5

    def rand(*shape: int) -> torch.Tensor:
        return 0.5 * torch.randn(*shape, generator=g)

    base = dict(in_proj_weight=rand(3 * e, e), in_proj_bias=rand(3 * e), bias_k=None, bias_v=None, add_zero_attn=False,
                dropout_p=0.0, out_proj_weight=rand(e, e), out_proj_bias=rand(e), training=False)
    q, k, v = rand(n_q, n, e), rand(n_k, n, e), rand(n_k, n, e)
    padding = torch.rand(n, n_k, generator=g) < 0.3
    padding[:, 0] = False
    causal = torch.ones(n_q, n_k, dtype=torch.bool).triu(1)
    return {
        "self_attention": ((q, q, q), base),
        "padding_float": ((q, k, v), base | dict(key_padding_mask=padding.float() * -1e4)),
        "mask_3d_float": ((q, k, v), base | dict(attn_mask=rand(n * N_HEADS, n_q, n_k))),
        "causal_hint_padding": ((q, k, v), base | dict(attn_mask=causal, is_causal=True, key_padding_mask=padding)),
        "bias_kv": ((q, k, v), base | dict(bias_k=rand(1, 1, e), bias_v=rand(1, 1, e), key_padding_mask=padding,
                                           attn_mask=causal)),
        "zero_attn": ((q, k, v), base | dict(add_zero_attn=True, key_padding_mask=padding, attn_mask=causal)),
        "kdim_vdim": ((q, rand(n_k, n, 5), rand(n_k, n, 3)), base | dict(
            use_separate_proj_weight=True, q_proj_weight=rand(e, e), k_proj_weight=rand(e, 5), v_proj_weight=rand(e, 3))),
        "static_kv": ((q, k, v), base | dict(static_k=rand(n * N_HEADS, 7, D_HEAD), static_v=rand(n * N_HEADS, 7, D_HEAD))),
        "unbatched": ((q[:, 0], k[:, 0], v[:, 0]), base | dict(key_padding_mask=padding[0], attn_mask=causal)),
        "no_biases": ((q, k, v), base | dict(in_proj_bias=None, out_proj_bias=None)),
    }


class Direct(nn.Module):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, options: dict):
        return F.multi_head_attention_forward(query, key, value, D_MODEL, N_HEADS, **options)


@pytest.mark.parametrize("option", list(_torch_options()))
def test_every_option_of_a_direct_call_read_exactly_and_recomputed_closely(option: str) -> None:
    (query, key, value), options = _torch_options()[option]
    for need_weights, average in ((True, True), (True, False), (False, True)):
        call = options | dict(need_weights=need_weights, average_attn_weights=average)
        expected, expected_weights = Direct()(query, key, value, call)
        wrapped = wrap(Direct())
        (out, weights), cache = wrapped.run_with_cache(query, key, value, call)
        assert torch.equal(out, expected)  # hooks that read leave torch's result as it is
        if need_weights:
            assert torch.equal(weights, expected_weights)
            pattern = cache["hook_pattern"] if query.ndim == 3 else cache["hook_pattern"][0]
            torch.testing.assert_close(pattern.mean(-3) if average else pattern, expected_weights)
        # A hook that returns a copy counts as an edit: the output is recomputed from the hooked tensors.
        out, weights = wrapped.run_with_hooks(query, key, value, call,
                                              fwd_hooks=[("hook_pattern", lambda p, hook: p.clone())])
        torch.testing.assert_close(out, expected)
        if need_weights:
            torch.testing.assert_close(weights, expected_weights)
