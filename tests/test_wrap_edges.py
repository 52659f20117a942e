"""wrap() used the way a hostile user would: hook points swapped for other modules, odd call patterns."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL
from torch import nn

from hooked_attn import unwrap, wrap

E, H = 8, 2
D_HEAD = E // H


class FlipKeys(nn.Module):
    """A module put where hook_pattern was: reverses the key axis (rows still sum to 1)."""

    def forward(self, pattern: torch.Tensor) -> torch.Tensor:
        return pattern.flip(-1)


def _mha(**kwargs: object) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True, **kwargs).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_(0.0, 0.5)
    return mha


def _by_hand(mha: nn.MultiheadAttention, x: torch.Tensor, flip: bool) -> torch.Tensor:
    """Self-attention output of ``mha`` on batch-first ``x``, the pattern's keys reversed when ``flip``."""
    q, k, v = (F.linear(x, w, b).unflatten(-1, (H, D_HEAD))
               for w, b in zip(mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3), strict=True))
    pattern = (torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D_HEAD)).softmax(-1)
    z = torch.einsum("bhqk,bkhd->bqhd", pattern.flip(-1) if flip else pattern, v)
    return mha.out_proj(z.flatten(-2))


class SelfAttention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attn = mha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def test_hook_points_of_a_multihead_module_swapped_for_other_modules() -> None:
    mha = _mha()
    reference = copy.deepcopy(mha)
    x = torch.randn(2, 5, E)
    wrapped = wrap(SelfAttention(mha))
    hooked = wrapped.module.attn
    hooked.hook_result = nn.Identity()  # read on every forward (opt-in point): must not break the forward
    hooked.hook_pattern = nn.Identity()
    with torch.no_grad():
        out, weights = hooked(x, x, x, need_weights=False)
        expected, _ = reference(x, x, x, need_weights=False)
        torch.testing.assert_close(out, expected, **TOL["tiny_fp32"])
        hooked.hook_pattern = FlipKeys()  # a module that changes what passes through: the output follows it
        out, _ = hooked(x, x, x, need_weights=False)
        torch.testing.assert_close(out, _by_hand(reference, x, flip=True), **TOL["tiny_fp32"])
        assert not torch.allclose(out, expected, atol=1e-3)
        wrapped.setup()  # re-reading the model drops the swapped names, keeps the others
        assert "attn.hook_pattern" not in wrapped.hook_dict and "attn.hook_z" in wrapped.hook_dict
        _, cache = wrapped.run_with_cache(x)
        torch.testing.assert_close(cache["attn.hook_z"], torch.einsum(
            "bhqk,bkhd->bqhd", (cache["attn.hook_attn_scores"].softmax(-1)).flip(-1), cache["attn.hook_v"]))


class TwoCalls(nn.Module):
    """One module, two SDPA calls per forward on [batch head pos d_head] views of its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unflatten(-1, (H, D_HEAD)).transpose(1, 2)
        first = F.scaled_dot_product_attention(h, h, h)
        second = F.scaled_dot_product_attention(first, h, h)
        return second.transpose(1, 2).flatten(-2)


def test_hook_points_of_an_sdpa_site_swapped_for_other_modules() -> None:
    model = nn.Sequential(TwoCalls())
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        expected = model(x)
        wrapped = wrap(model).discover(x)
        assert sorted(wrapped.sites) == ["0", "0.call_1"]
        site = wrapped.sites["0.call_1"]
        site.hook_z = nn.Identity()  # reads only: the kernel's output is kept
        assert torch.equal(wrapped(x), expected)
        site.hook_pattern = FlipKeys()  # nothing else hooked: the wrapper must still route the call through it
        out = wrapped(x)
        h = x.unflatten(-1, (H, D_HEAD)).transpose(1, 2)
        first = F.scaled_dot_product_attention(h, h, h)
        pattern = (first @ h.transpose(-1, -2) / math.sqrt(D_HEAD)).softmax(-1)
        torch.testing.assert_close(out, (pattern.flip(-1) @ h).transpose(1, 2).flatten(-2))
        wrapped.setup()
        assert "0.call_1.hook_pattern" not in wrapped.hook_dict and "0.call_1.hook_q" in wrapped.hook_dict
        _, cache = wrapped.run_with_cache(x)
        torch.testing.assert_close(cache["0.call_1.hook_q"], first.transpose(1, 2))


def test_inference_mode_caching_is_exact_and_in_place_edits_count() -> None:
    model = nn.Sequential(TwoCalls())
    x = torch.randn(2, 5, E)

    def first_key_only(pattern: torch.Tensor, hook: object) -> None:
        pattern.zero_()[..., 0] = 1.0  # in place: inference tensors keep no version counter to tell

    with torch.inference_mode():
        expected = model(x)
        wrapped = wrap(model)
        out, cache = wrapped.run_with_cache(x)
        assert torch.equal(out, expected)
        h = x.unflatten(-1, (H, D_HEAD)).transpose(1, 2)
        first = F.scaled_dot_product_attention(h, h, h)
        torch.testing.assert_close(cache["0.hook_z"], first.transpose(1, 2))
        edited = wrapped.run_with_hooks(x, fwd_hooks=[("0.hook_pattern", first_key_only)])
        # Every query of the first call now reads value 0 only.
        first = h[:, :, :1].expand_as(h)
        torch.testing.assert_close(edited, F.scaled_dot_product_attention(first, h, h).transpose(1, 2).flatten(-2))
    assert wrapped.n_hooks() == 0


def _torch_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


class Mixed(nn.Module):
    """An encoder (swapped nn.MultiheadAttention), two SDPA calls, and a direct need_weights=True call."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.calls = TwoCalls()
        self.mha = nn.MultiheadAttention(E, H)  # its weights, used by a direct call below

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.calls(self.encoder(x)).transpose(0, 1)
        m = self.mha
        out, _ = F.multi_head_attention_forward(h, h, h, E, H, m.in_proj_weight, m.in_proj_bias, None, None, False,
                                                0.0, m.out_proj.weight, m.out_proj.bias, training=False)
        return out.transpose(0, 1)


def test_errors_mid_forward_and_unwrap_leave_nothing_attached() -> None:
    from torch.overrides import _get_current_function_mode_stack

    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        expected = model(x)
    bare = _torch_hooks(model)
    wrapped = wrap(model)
    own = _torch_hooks(model)  # the swapped modules' nested-tensor guard
    with torch.no_grad():
        plain = wrapped(x)  # the encoder layer's fused path now gives way: equal to rounding
    torch.testing.assert_close(plain, expected)
    with pytest.raises(ValueError):  # the wrong width, during discovery
        wrapped.run_with_cache(torch.randn(2, 5, E + 1))
    assert not wrapped.discovered and not wrapped._discovering
    wrapped.discover(x)
    assert wrapped.attention_layers == ["encoder.layers.0.self_attn", "calls", "calls.call_1", ""]

    def boom(t: torch.Tensor, hook: object) -> None:
        raise RuntimeError(f"boom at {hook.name}")

    for name in ("encoder.layers.0.self_attn.hook_pattern", "calls.call_1.hook_q", "hook_pattern", "hook_z"):
        with pytest.raises(RuntimeError, match=f"boom at {name}"):
            wrapped.run_with_hooks(x, fwd_hooks=[(name, boom)])
        assert wrapped.n_hooks() == 0 and _torch_hooks(model) == own
        assert not _get_current_function_mode_stack() and wrapped._tracker._users == 0
        with torch.no_grad():
            assert torch.equal(wrapped(x), plain)
    with torch.no_grad():
        # (the swapped module materialises its pattern while it is cached: equal to rounding)
        torch.testing.assert_close(wrapped.run_with_cache(x)[0], plain)
    wrapped.add_perma_hook("calls.hook_pattern", lambda p, hook: p.flip(-1))  # left attached, then unwrapped
    restored = unwrap(wrapped)
    assert restored is model and _torch_hooks(model) == bare
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_a_multihead_module_called_twice_per_forward_is_named_in_a_warning(caplog) -> None:
    mha = _mha()

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(2):  # one layer's weights, applied twice (weight sharing)
                x = x + self.attn(x, x, x, need_weights=False)[0]
            return x

    wrapped = wrap(Twice())
    with torch.no_grad():
        wrapped.run_with_cache(torch.randn(2, 5, E))
    assert "'attn' (2 calls)" in caplog.text and "only the last call's" in caplog.text


class ScaledQuery(nn.MultiheadAttention):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: object):
        return super().forward(2.0 * query, key, value, **kwargs)


def test_an_encoder_layer_runs_a_kept_subclass_forward_hooked_or_not() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True)
    layer.self_attn = ScaledQuery(E, H, batch_first=True)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        fused = model(x)  # torch's fused layer skips the subclass's forward (its query scaling)
    ordinary = model(x)  # with gradients torch runs the ordinary path, which calls it
    assert not torch.allclose(fused, ordinary, atol=1e-2)
    wrapped = wrap(model)
    with torch.no_grad():
        plain = wrapped(x)
        cached, cache = wrapped.run_with_cache(x)
    torch.testing.assert_close(plain, ordinary)  # unhooked runs too: not a different model when hooked
    torch.testing.assert_close(cached, ordinary)
    assert "layers.0.self_attn.hook_pattern" in cache
    unwrap(wrapped)
    assert _torch_hooks(model) == 0
    with torch.no_grad():
        assert torch.equal(model(x), fused)
