"""One hooked ``torch.nn.functional.scaled_dot_product_attention`` call site and how it runs.

``AttentionSite`` holds the six hook points of one call site; ``hooked_sdpa`` runs one call through
them. Whatever layout the caller used, the hooks see the glossary's axes:

- ``query`` ``[batch head q_pos d_head]`` (SDPA's own layout) is shown as ``hook_q [batch q_pos head d_head]``;
  ``key``/``value`` likewise as ``hook_k``/``hook_v [batch k_pos kv_head d_head]``.
- More than one leading axis (``[n1 n2 head pos d_head]``) is flattened into ``batch`` (``n1*n2``);
  a 3-D input ``[n pos d_head]`` has one head (``head = 1``); a 2-D input is a batch of one.
- ``hook_attn_scores``/``hook_pattern [batch head q_pos k_pos]``; ``hook_z [batch q_pos head d_head]``
  is the call's output.

With nothing attached the call is the original kernel. When hooks only read (nothing replaced, nothing
edited in place: ``Tensor._version`` tells, or a copy under ``torch.inference_mode``), the output is still the original kernel's, and scores and
pattern are computed beside it. When a hook replaces or edits q, k, v, the scores or the pattern, the
output is the explicit computation ``softmax(q k^T * scale + mask) v`` from the edited tensors.
"""

import inspect
import math
from dataclasses import dataclass
from typing import Any

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_attn.hook_points import HookPoint, is_hooked

SDPA = F.scaled_dot_product_attention
_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
SITES = ("q", "k", "v", "attn_scores", "pattern", "z")


class AttentionSite(nn.Module):
    """The hook points of one ``scaled_dot_product_attention`` call site (no parameters).

    ``path`` is the calling module's path inside the wrapped model, ``call`` the index of the call
    among that module's calls in one forward, ``prefix`` the hook-name prefix both give.
    """

    def __init__(self, path: str, call: int, prefix: str) -> None:
        super().__init__()
        self.path, self.call, self.prefix = path, call, prefix
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()

    def points(self) -> dict[str, nn.Module]:
        """The module at each site: a HookPoint, or whatever a user put in its place."""
        return {site: getattr(self, f"hook_{site}") for site in SITES}

    def extra_repr(self) -> str:
        return f"path={self.path!r}, call={self.call}"


@dataclass
class Weights:
    """What ``hooked_sdpa`` reports to a caller that must return the attention weights itself
    (``multi_head_attention_forward(need_weights=True)``, run through SDPA by ``capture.py``)."""

    pattern: Float[Tensor, "batch head q_pos k_pos"] | None = None  # after the hooks and after dropout
    replaced: bool = False  # the output is not the plain kernel's on the caller's inputs (an edit, backward hooks)


def bind_sdpa_args(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """SDPA's arguments by name, defaults filled in."""
    if len(args) > len(_PARAMS):
        raise TypeError(f"scaled_dot_product_attention takes at most {len(_PARAMS)} arguments, got {len(args)}")
    bound = dict(_DEFAULTS) | dict(zip(_PARAMS, args)) | kwargs
    unknown = set(bound) - set(_PARAMS)
    if unknown or not {"query", "key", "value"} <= set(bound):
        raise TypeError(f"scaled_dot_product_attention got unexpected arguments {sorted(unknown)} "
                        f"or lacks query/key/value; signature {inspect.signature(SDPA)}")
    return bound


def _to_glossary(t: Tensor, lead: torch.Size | None) -> Float[Tensor, "batch pos head d_head"]:
    """``[*lead head pos d]`` (or ``[n pos d]``, ``[pos d]``) as a ``[batch pos head d]`` view."""
    if t.ndim == 2:
        return t[None, :, None]
    if t.ndim == 3:
        return t[:, :, None]
    return t.expand(*lead, *t.shape[-3:]).flatten(0, len(lead) - 1).transpose(1, 2)


def _from_glossary(t: Float[Tensor, "batch pos head d_head"], ndim: int, lead: torch.Size | None) -> Tensor:
    """The inverse of ``_to_glossary``: back to the caller's layout."""
    if ndim == 2:
        return t[0, :, 0]
    if ndim == 3:
        return t[:, :, 0]
    return t.transpose(1, 2).unflatten(0, lead)


def _additive_mask(bound: dict[str, Any], q: Tensor, n_keys: int, dtype: torch.dtype,
                   lead: torch.Size | None) -> Float[Tensor, "#batch #head q_pos k_pos"] | None:
    """attn_mask and is_causal as one additive mask in the scores' layout (bool True = may attend)."""
    mask, n_queries = bound["attn_mask"], q.shape[-2]
    if bound["is_causal"]:
        allowed = torch.ones(n_queries, n_keys, dtype=torch.bool, device=q.device).tril()  # SDPA: top-left aligned
        return torch.zeros(n_queries, n_keys, dtype=dtype, device=q.device).masked_fill(~allowed, float("-inf"))[None, None]
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    full = mask.to(dtype).broadcast_to(*q.shape[:-1], n_keys)
    if q.ndim == 2:
        return full[None, None]
    if q.ndim == 3:
        return full[:, None]
    return full.expand(*lead, *full.shape[-3:]).flatten(0, len(lead) - 1)


def _softmax_or_zeros(scores: Float[Tensor, "batch head q_pos k_pos"]) -> Float[Tensor, "batch head q_pos k_pos"]:
    """Softmax over keys in float32 at least; a row with no allowed key gives zeros, as SDPA does."""
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
    work = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    return work.masked_fill(dead, 0.0).softmax(dim=-1).masked_fill(dead, 0.0).to(scores.dtype)


def _edited(new: Tensor, old: Tensor, version: int) -> bool:
    """Whether a hook replaced ``old`` or wrote into it."""
    return new is not old or old._version != version


def _bwd_hooked(point: nn.Module) -> bool:
    return is_hooked(point) and bool(getattr(point, "bwd_hooks", ()))


def _run(point: nn.Module, x: Tensor) -> tuple[Tensor, bool]:
    """The hook point's output, and whether its hooks (or a module swapped in for it) edited the activation."""
    if not is_hooked(point):
        return x, False
    if x.is_inference():
        # Tensors made under torch.inference_mode keep no version counter: compare with a copy instead.
        before = x.clone()
        out = point(x)
        return out, out is not x or not torch.equal(x, before)
    version = x._version
    out = point(x)
    return out, _edited(out, x, version)


def hooked_sdpa(site: AttentionSite, args: tuple, kwargs: dict[str, Any], weights: Weights | None = None) -> Tensor:
    """``scaled_dot_product_attention(*args, **kwargs)`` through ``site``'s hook points.

    With ``weights``, the pattern is computed even when nothing hooks it (and, under dropout, the
    explicit path runs, so that the dropped pattern is the one the output used) and reported there.
    """
    points = site.points()
    if not any(is_hooked(p) for p in points.values()):
        return SDPA(*args, **kwargs)
    bound = bind_sdpa_args(args, kwargs)
    query, key, value = bound["query"], bound["key"], bound["value"]
    if bound["is_causal"] and bound["attn_mask"] is not None:
        raise ValueError(f"{site.prefix}: scaled_dot_product_attention got both attn_mask and is_causal=True")
    if not (query.ndim == key.ndim == value.ndim and query.ndim >= 2):
        raise ValueError(f"{site.prefix}: query, key and value must have the same rank (>= 2), got shapes "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    lead = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3]) if query.ndim >= 4 else None
    q, q_edit = _run(points["q"], _to_glossary(query, lead))
    k, k_edit = _run(points["k"], _to_glossary(key, lead))
    v, v_edit = _run(points["v"], _to_glossary(value, lead))
    explicit = q_edit or k_edit or v_edit or any(_bwd_hooked(points[s]) for s in ("attn_scores", "pattern"))
    explicit = explicit or (weights is not None and bound["dropout_p"] > 0.0)
    pattern = None
    if explicit or is_hooked(points["attn_scores"]) or is_hooked(points["pattern"]) or weights is not None:
        n_heads, n_kv = q.shape[2], k.shape[2]
        if n_heads != n_kv:
            if not bound["enable_gqa"] or n_heads % n_kv:
                raise ValueError(f"{site.prefix}: {n_heads} query heads and {n_kv} key heads need enable_gqa=True "
                                 "and a whole number of query heads per key head")
            k_full, v_full = (t.repeat_interleave(n_heads // n_kv, dim=2) for t in (k, v))
        else:
            k_full, v_full = k, v
        scale = bound["scale"] if bound["scale"] is not None else 1.0 / math.sqrt(query.shape[-1])
        scores = einops.einsum(q, k_full, "batch q_pos head d_head, batch k_pos head d_head -> batch head q_pos k_pos")
        scores = scores * scale
        mask = _additive_mask(bound, query, key.shape[-2], scores.dtype, lead)
        if mask is not None:
            scores = scores + mask
        scores, s_edit = _run(points["attn_scores"], scores)
        pattern, p_edit = _run(points["pattern"], _softmax_or_zeros(scores))
        explicit = explicit or s_edit or p_edit
    out = None
    if explicit:
        assert pattern is not None
        pattern = F.dropout(pattern, p=bound["dropout_p"]) if bound["dropout_p"] > 0.0 else pattern
        z = einops.einsum(pattern, v_full, "batch head q_pos k_pos, batch k_pos head d_head -> batch q_pos head d_head")
    else:
        if any(_bwd_hooked(points[s]) for s in ("q", "k", "v")):
            # Feed the kernel the hooked views (same values and strides) so backward hooks see gradients.
            bound = bound | {"query": _from_glossary(q, query.ndim, lead), "key": _from_glossary(k, key.ndim, lead),
                             "value": _from_glossary(v, value.ndim, lead)}
            out = SDPA(**bound)
        else:
            out = SDPA(*args, **kwargs)
        z = _to_glossary(out, lead)
    z, z_edit = _run(points["z"], z)
    if weights is not None:
        weights.pattern = pattern
        weights.replaced = explicit or z_edit or any(_bwd_hooked(p) for p in points.values())
    if out is not None and not z_edit:
        return out
    return _from_glossary(z, query.ndim, lead)
