"""wrap() on models that call scaled_dot_product_attention themselves: names, layouts, options, edits."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hooked_attn import wrap
from hooked_attn.analysis import attention_viewer, pattern_names, stack_patterns, text_heatmap

SDPA_OPTIONS = {
    "plain": {},
    "bool_mask": {"mask": "bool"},
    "float_mask": {"mask": "float"},
    "causal": {"is_causal": True},
    "scale": {"scale": 0.3},
    "gqa": {"enable_gqa": True},
    "rectangular_causal": {"is_causal": True, "n_keys": 7},
}


class CallsSdpa(nn.Module):
    """Projects x and calls SDPA twice in one forward: self-attention, then attention to ``memory``."""

    def __init__(self, d_model: int = 16, n_heads: int = 4, n_kv_heads: int = 4, **options: object) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.d_head = n_heads, n_kv_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * n_kv_heads * self.d_head)
        self.out = nn.Linear(d_model, d_model)
        self.options = options

    def forward(self, x: torch.Tensor, memory: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self.q(x).unflatten(-1, (self.n_heads, self.d_head)).transpose(1, 2)  # [batch head pos d_head]
        outs = []
        for source in (x, memory):
            k, v = self.kv(source).unflatten(-1, (2, self.n_kv_heads, self.d_head)).permute(2, 0, 3, 1, 4)
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask if source is memory else None,
                                                       **self.options))
        return self.out((outs[0] + outs[1]).transpose(1, 2).flatten(-2))


class Stack(nn.Module):
    def __init__(self, n_layers: int = 2, **kwargs: object) -> None:
        super().__init__()
        self.layers = nn.ModuleList([CallsSdpa(**kwargs) for _ in range(n_layers)])

    def forward(self, x: torch.Tensor, memory: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x, memory, attn_mask)
        return x


def _inputs(n_keys: int = 5, mask: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    x, memory = torch.randn(2, 5, 16, generator=g), torch.randn(2, n_keys, 16, generator=g)
    if mask == "bool":
        attn_mask = torch.rand(2, 1, 5, n_keys, generator=g) > 0.4
        attn_mask[..., 0] = True
    elif mask == "float":
        attn_mask = torch.randn(2, 4, 5, n_keys, generator=g)
    else:
        attn_mask = None
    return x, memory, attn_mask


def _explicit(q, k, v, attn_mask, is_causal, scale):
    """A hand computation from the hooked tensors ([batch pos head d_head]), independent of the library."""
    if k.shape[2] != q.shape[2]:
        k, v = (t.repeat_interleave(q.shape[2] // t.shape[2], dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if is_causal:
        scores = scores.masked_fill(~torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril(), float("-inf"))
    if attn_mask is not None:
        scores = scores + (attn_mask if attn_mask.is_floating_point()
                           else torch.zeros(attn_mask.shape).masked_fill(~attn_mask, float("-inf")))
    pattern = scores.softmax(-1)
    return pattern, torch.einsum("bhqk,bkhd->bqhd", pattern, v)


@pytest.mark.parametrize("variant", list(SDPA_OPTIONS))
def test_every_call_is_hooked_and_patterns_match_a_hand_computation(variant: str) -> None:
    options = dict(SDPA_OPTIONS[variant])
    n_keys, mask = options.pop("n_keys", 5), options.pop("mask", None)
    torch.manual_seed(0)
    model = Stack(n_kv_heads=2 if options.get("enable_gqa") else 4, **options).eval()
    x, memory, attn_mask = _inputs(n_keys, mask)
    with torch.no_grad():
        expected = model(x, memory, attn_mask)
        wrapped = wrap(model)
        out, cache = wrapped.run_with_cache(x, memory, attn_mask)
    assert torch.equal(out, expected)  # caching everything reads; the kernel's output is kept
    assert wrapped.attention_layers == ["layers.0", "layers.0.call_1", "layers.1", "layers.1.call_1"]
    for layer, prefix in enumerate(wrapped.attention_layers):
        q, k, v = (cache[f"{prefix}.hook_{site}"] for site in "qkv")
        assert q.shape == (2, 5, 4, 4) and k.shape[2] == v.shape[2] == (2 if options.get("enable_gqa") else 4)
        uses_mask = attn_mask if prefix.endswith("call_1") else None
        causal = options.get("is_causal", False)
        pattern, z = _explicit(q, k, v, uses_mask, causal, options.get("scale"))
        torch.testing.assert_close(cache["pattern", layer], pattern)
        torch.testing.assert_close(cache["z", layer], z)
        torch.testing.assert_close(cache["pattern", layer].sum(-1), torch.ones(2, 4, 5))
    with torch.no_grad():
        assert torch.equal(wrapped(x, memory, attn_mask), expected)  # nothing attached: the original kernels


def test_a_pattern_cache_alone_leaves_the_output_bit_identical_and_edits_follow_the_explicit_computation() -> None:
    torch.manual_seed(0)
    model = Stack().eval()
    x, memory, attn_mask = _inputs(mask="bool")
    wrapped = wrap(model)
    with torch.no_grad():
        expected = model(x, memory, attn_mask)
        out, cache = wrapped.run_with_cache(x, memory, attn_mask, names_filter=lambda n: n.endswith("hook_pattern"))
        assert torch.equal(out, expected) and len(cache) == 4

        # Doubling z of one call: the layer's output changes as out(z) says.
        def double(z, hook):
            return 2 * z

        edited = wrapped.run_with_hooks(x, memory, attn_mask, fwd_hooks=[("layers.1.call_1.hook_z", double)])
        layer = model.layers[1]
        x1 = x + model.layers[0](x, memory, attn_mask)
        _, full = wrapped.run_with_cache(x, memory, attn_mask)
        z0, z1 = full["layers.1.hook_z"], full["layers.1.call_1.hook_z"]
        torch.testing.assert_close(edited, x1 + layer.out((z0 + 2 * z1).flatten(-2)))

        # Replacing the pattern by uniform attention: z becomes the mean of v.
        def uniform(pattern, hook):
            return torch.full_like(pattern, 1 / pattern.shape[-1])

        seen = {}
        wrapped.run_with_hooks(x, memory, attn_mask, fwd_hooks=[
            ("layers.0.hook_pattern", uniform), ("layers.0.hook_z", lambda z, hook: seen.setdefault("z", z)),
            ("layers.0.hook_v", lambda v, hook: seen.setdefault("v", v))])
        torch.testing.assert_close(seen["z"], seen["v"].mean(1, keepdim=True).expand_as(seen["z"]))

        # An in-place edit of q (no tensor returned) is seen too: scores follow the edited q.
        def zero_q(q, hook):
            q.zero_()

        _, zeroed = wrapped.run_with_cache(x, memory, attn_mask, names_filter="layers.0.hook_pattern")
        with wrapped.hooks(fwd_hooks=[("layers.0.hook_q", zero_q)]):
            _, zeroed = wrapped.run_with_cache(x, memory, attn_mask, names_filter="layers.0.hook_pattern")
        torch.testing.assert_close(zeroed["layers.0.hook_pattern"], torch.full((2, 4, 5, 5), 0.2))
    assert wrapped.n_hooks() == 0


def test_dropout_is_applied_after_the_pattern_in_training_mode() -> None:
    torch.manual_seed(0)
    model = Stack(n_layers=1, dropout_p=0.5).train()
    x, memory, _ = _inputs()
    wrapped = wrap(model)
    _, cache = wrapped.run_with_cache(x, memory)
    torch.testing.assert_close(cache["pattern", 0].sum(-1), torch.ones(2, 4, 5))  # before dropout
    seen = {}
    with torch.no_grad():
        wrapped.run_with_hooks(x, memory, fwd_hooks=[
            ("layers.0.hook_pattern", lambda p, hook: p.clone()),  # forces the explicit path
            ("layers.0.hook_z", lambda z, hook: seen.setdefault("z", z)),
            ("layers.0.hook_v", lambda v, hook: seen.setdefault("v", v))])
    # Each z is a sum of v rows weighted by a dropped-out pattern (zeros and 2x weights): not the undropped z.
    undropped = torch.einsum("bhqk,bkhd->bqhd", cache["pattern", 0], seen["v"])
    assert not torch.allclose(seen["z"], undropped)


@pytest.mark.parametrize("layout", ["5d", "3d", "2d"])
def test_other_layouts_map_onto_batch_pos_head_d_head(layout: str) -> None:
    g = torch.Generator().manual_seed(0)
    shape = {"5d": (2, 3, 4, 5, 8), "3d": (6, 5, 8), "2d": (5, 8)}[layout]
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))

    class Direct(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    wrapped = wrap(Direct())
    out, cache = wrapped.run_with_cache(q, k, v)
    expected = {"5d": (6, 5, 4, 8), "3d": (6, 5, 1, 8), "2d": (1, 5, 1, 8)}[layout]
    assert cache["hook_q"].shape == cache["hook_z"].shape == expected
    assert cache["hook_pattern"].shape == (expected[0], expected[2], 5, 5)
    torch.testing.assert_close(cache["hook_z"].reshape(-1), F.scaled_dot_product_attention(q, k, v).reshape(
        *shape[:-3], shape[-3], 5, 8).transpose(-2, -3).reshape(-1) if layout == "5d" else out.reshape(-1))
    out2 = wrapped.run_with_hooks(q, k, v, fwd_hooks=[("hook_z", lambda z, hook: z * 3)])
    torch.testing.assert_close(out2, 3 * out)


def test_multihead_modules_and_direct_calls_in_one_model_and_the_analysis_tools() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()

    class Direct(nn.Module):  # calls SDPA itself on [pos batch d] input read as one head
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x)

    model = nn.ModuleDict({"encoder": encoder, "direct": Direct()})
    x = torch.randn(2, 6, 16)

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner["direct"](self.inner["encoder"](x))

    both = Both()
    wrapped = wrap(both)
    with torch.no_grad():
        out, cache = wrapped.run_with_cache(x)
    assert wrapped.attention_layers == ["inner.encoder.layers.0.self_attn", "inner.encoder.layers.1.self_attn",
                                        "inner.direct"]
    assert cache["pattern", -1].shape == (2, 1, 6, 6)
    assert list(pattern_names(cache)) == [0, 1, 2]
    with pytest.raises(ValueError, match="differ in shape"):
        stack_patterns(cache)
    assert stack_patterns(cache, layers=[0, 1]).shape == (2, 2, 4, 6, 6)
    page = attention_viewer(cache, [f"x{i}" for i in range(6)], layers=[0, 1], causal=False).html
    assert "no attention patterns" not in page
    assert "x5" in text_heatmap(cache["pattern", 0], [f"x{i}" for i in range(6)], head=1)


def test_unknown_names_before_discovery_say_what_to_do() -> None:
    wrapped = wrap(Stack())
    with pytest.raises(KeyError, match="not discovered yet"):
        wrapped.add_hook("layers.0.hook_pattern", lambda p, hook: None)
    wrapped.discover(*_inputs()[:2])
    assert "layers.0.hook_pattern" in wrapped.hook_dict
    with pytest.raises(IndexError, match="4 attention layers"):
        wrapped.run_with_cache(*_inputs()[:2])[1]["pattern", 4]


def test_backward_hooks_see_the_gradients_of_every_site() -> None:
    torch.manual_seed(0)
    model = Stack()
    x, memory, attn_mask = _inputs(mask="bool")
    wrapped = wrap(model)
    expected = model(x, memory, attn_mask)
    # Gradients of q alone: the fused kernel still runs (on the hooked views), output bit-identical.
    out, cache = wrapped.run_with_cache(x, memory, attn_mask, names_filter=lambda n: n.endswith("hook_q"),
                                        incl_bwd="deferred")
    assert torch.equal(out, expected)
    out.sum().backward()
    assert cache["layers.0.hook_q_grad"].shape == (2, 5, 4, 4) and cache["layers.0.hook_q_grad"].abs().sum() > 0
    # Gradients of the pattern: the explicit path; d(sum of out)/d(pattern) of a call is z's gradient times v.
    out, cache = wrapped.run_with_cache(x, memory, attn_mask, incl_bwd="deferred")
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    for prefix in wrapped.attention_layers:
        grad_z, v = cache[f"{prefix}.hook_z_grad"], cache[f"{prefix}.hook_v"]
        torch.testing.assert_close(cache[f"{prefix}.hook_pattern_grad"], torch.einsum("bqhd,bkhd->bhqk", grad_z, v))
    assert wrapped.n_hooks() == 0


def test_a_deep_copy_has_its_own_sites_and_hooks() -> None:
    import copy

    torch.manual_seed(0)
    wrapped = wrap(Stack())
    x, memory, _ = _inputs()
    wrapped.discover(x, memory)
    twin = copy.deepcopy(wrapped)
    assert twin.attention_layers == wrapped.attention_layers and twin.module is not wrapped.module
    with torch.no_grad():
        out, cache = twin.run_with_cache(x, memory)
        assert torch.equal(out, wrapped(x, memory))
    assert twin.hook_dict["layers.0.hook_pattern"] is not wrapped.hook_dict["layers.0.hook_pattern"]
    assert cache["pattern", 0].shape == (2, 4, 5, 5) and twin.n_hooks() == wrapped.n_hooks() == 0


def test_a_hook_that_runs_the_model_again_does_not_disturb_the_naming() -> None:
    torch.manual_seed(0)
    wrapped = wrap(Stack())
    x, memory, _ = _inputs()
    wrapped.discover(x, memory)
    inner = {}

    def rerun(q, hook):
        if not inner:  # once: a nested forward (with its own hooked call) from inside a hook
            inner["started"] = True
            inner["out"] = wrapped.run_with_hooks(x, memory, fwd_hooks=[("layers.1.hook_z", lambda z, hook: None)])

    with torch.no_grad():
        _, cache = wrapped.run_with_cache(x, memory, names_filter=lambda n: n.endswith("hook_pattern"))
        wrapped.add_hook("layers.0.hook_q", rerun)
        out, again = wrapped.run_with_cache(x, memory, names_filter=lambda n: n.endswith("hook_pattern"))
        wrapped.reset_hooks()
    assert list(again) == list(cache) and sorted(wrapped.hook_dict) == sorted(set(wrapped.hook_dict))
    assert len(wrapped.attention_layers) == 4 and "out" in inner
