"""HookedMultiheadAttention: ``nn.MultiheadAttention`` with a hook at every site, sharing the original's weights.

Mirrors ``torch.nn.functional.multi_head_attention_forward`` (torch 2.x): the same projections,
bias_k/bias_v, add_zero_attn, masks, is_causal, dropout and returned weights. Every hook sees
batch-first tensors in the glossary's axis order, whatever the module's ``batch_first``.
"""

import logging
import math

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn

from hooked_attn.hook_points import HookPoint, is_hooked

logger = logging.getLogger(__name__)

# nn.MultiheadAttention's mask convention: bool True = may NOT attend; float = added to the scores.
TorchMask = Bool[Tensor, "..."] | Float[Tensor, "..."]
Additive = Float[Tensor, "#batch #head #q_pos k_pos"]


def _refuse_nested(module: nn.Module, args: tuple) -> None:
    # Registered as a forward pre-hook. Besides this check, its presence switches off
    # nn.TransformerEncoderLayer's fused inference path, which tests for forward hooks on its
    # submodules and would otherwise never call self_attn (so no hook would fire).
    if any(isinstance(a, Tensor) and a.is_nested for a in args):
        raise ValueError(
            "HookedMultiheadAttention got a NestedTensor; it needs padded tensors. (nn.TransformerEncoder "
            "builds nested tensors on its fast path: wrap() turns that off with use_nested_tensor=False.)"
        )


class HookedMultiheadAttention(nn.Module):
    """A drop-in replacement for one ``nn.MultiheadAttention`` that exposes its activations.

    The parameters are the original module's own ``Parameter`` objects (and its ``out_proj``
    module), registered under the same names, so the state dict is unchanged and training either
    module trains both. ``original`` is the replaced module, which ``unwrap`` puts back.

    Hooks (``head d_head`` split from ``embed_dim``; ``k_pos`` counts bias_k and zero-attention
    positions when the module adds them):

    - ``hook_q [batch q_pos head d_head]``, ``hook_k``/``hook_v [batch k_pos head d_head]``
    - ``hook_attn_scores [batch head q_pos k_pos]``: scaled scores plus the additive mask
      (-inf where a boolean mask forbids), before the softmax
    - ``hook_pattern [batch head q_pos k_pos]``: after the softmax, before dropout; exactly 0 at
      masked keys, and a row of zeros for a query that may see no key
    - ``hook_z [batch q_pos head d_head]``: pattern-weighted values
    - ``hook_result [batch q_pos head d_model]``: each head's share of the output (before
      ``out_proj.bias``); computed only when hooked or when ``use_attn_result`` is True
    """

    def __init__(self, original: nn.MultiheadAttention) -> None:
        super().__init__()
        for name in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout",
                     "batch_first", "head_dim", "add_zero_attn"):
            setattr(self, name, getattr(original, name))
        for name, param in original._parameters.items():
            self.register_parameter(name, param)
        if "bias_k" not in original._parameters:
            self.bias_k = self.bias_v = None
        self.out_proj = original.out_proj
        self.training = original.training
        # Not a registered submodule: its parameters are already ours, under the same names.
        object.__setattr__(self, "original", original)
        self.use_attn_result = False
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()
        self.hook_result = HookPoint(opt_in=True)
        self.register_forward_pre_hook(_refuse_nested)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, vdim={self.vdim}, "
                f"batch_first={self.batch_first}, dropout={self.dropout}")

    def forward(
        self, query: Float[Tensor, "..."], key: Float[Tensor, "..."], value: Float[Tensor, "..."],
        key_padding_mask: TorchMask | None = None, need_weights: bool = True, attn_mask: TorchMask | None = None,
        average_attn_weights: bool = True, is_causal: bool = False,
    ) -> tuple[Float[Tensor, "..."], Float[Tensor, "..."] | None]:
        """``nn.MultiheadAttention.forward``: same arguments, same ``(output, weights)`` return.

        Raises:
            ValueError: inputs or masks of the wrong shape or dtype, or ``is_causal`` without ``attn_mask``.
        """
        batched = query.ndim == 3
        self._check_inputs(query, key, value, batched)
        if not batched:
            query, key, value = query[None], key[None], value[None]
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n_batch, n_queries, n_keys = query.shape[0], query.shape[1], key.shape[1]
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True needs attn_mask (as in nn.MultiheadAttention): pass the causal mask too")
        # nn.MultiheadAttention trusts the is_causal hint (ignores attn_mask) only in this case.
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = None if causal else self._additive_mask(attn_mask, key_padding_mask, n_batch, n_queries, n_keys, query.dtype)

        q, k, v = self._project(query, key, value)
        k, v, mask = self._extra_keys(k, v, mask)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights or is_hooked(self.hook_attn_scores) or is_hooked(self.hook_pattern):
            if causal:
                mask = _causal_additive(n_queries, k.shape[1], q.dtype, q.device)
            z, weights = self._explicit_attention(q, k, v, mask, dropout)
        else:
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=dropout,
                is_causal=causal,
            ).transpose(1, 2)
        out = self._output(self.hook_z(z))

        if not batched:
            out = out[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        assert weights is not None
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, (weights if batched else weights[0])

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor, batched: bool) -> None:
        shapes = f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        if query.ndim not in (2, 3) or key.ndim != query.ndim or value.ndim != query.ndim:
            raise ValueError(f"query, key and value must all be 3-D (batched) or all 2-D (unbatched); got {shapes}")
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != width:
                raise ValueError(f"{name} must have last dimension {width}; got {shapes}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key and value must agree in every axis but the last; got {shapes}")
        batch_axis = 0 if self.batch_first else 1
        if batched and query.shape[batch_axis] != key.shape[batch_axis]:
            raise ValueError(f"query and key have different batch sizes (batch_first={self.batch_first}); got {shapes}")

    def _additive_mask(
        self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, n_batch: int, n_queries: int,
        n_keys: int, dtype: torch.dtype,
    ) -> Additive | None:
        """One additive mask ``[batch|1 head|1 q_pos k_pos]`` from nn.MultiheadAttention's two masks."""
        mask = None
        if attn_mask is not None:
            additive = _as_additive(attn_mask, "attn_mask", dtype)
            if attn_mask.ndim == 2 and attn_mask.shape == (n_queries, n_keys):
                mask = additive[None, None]
            elif attn_mask.ndim == 3 and attn_mask.shape == (n_batch * self.num_heads, n_queries, n_keys):
                mask = additive.unflatten(0, (n_batch, self.num_heads))
            else:
                raise ValueError(
                    f"attn_mask must be [q_pos k_pos] = {(n_queries, n_keys)} or [batch*head q_pos k_pos] = "
                    f"{(n_batch * self.num_heads, n_queries, n_keys)}; got {tuple(attn_mask.shape)}"
                )
        if key_padding_mask is not None:
            if key_padding_mask.shape != (n_batch, n_keys):
                raise ValueError(
                    f"key_padding_mask must be [batch k_pos] = {(n_batch, n_keys)} ([k_pos] for unbatched input); "
                    f"got {tuple(key_padding_mask.shape)}"
                )
            padding = _as_additive(key_padding_mask, "key_padding_mask", dtype)[:, None, None, :]
            mask = padding if mask is None else mask + padding
        return mask

    def _project(
        self, query: Float[Tensor, "batch q_pos d_model"], key: Float[Tensor, "batch k_pos kdim"],
        value: Float[Tensor, "batch k_pos vdim"],
    ) -> tuple[Float[Tensor, "batch q_pos head d_head"], Float[Tensor, "batch k_pos head d_head"],
               Float[Tensor, "batch k_pos head d_head"]]:
        e = self.embed_dim
        b_q, b_k, b_v = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight[:e], self.in_proj_weight[e:2 * e], self.in_proj_weight[2 * e:]
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        if self._qkv_same_embed_dim and query is key and key is value:
            # Self-attention: one matmul for q, k and v (as torch's _in_projection_packed).
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        split = (self.num_heads, self.head_dim)
        return q.unflatten(-1, split), k.unflatten(-1, split), v.unflatten(-1, split)

    def _extra_keys(
        self, k: Float[Tensor, "batch k_pos head d_head"], v: Float[Tensor, "batch k_pos head d_head"],
        mask: Additive | None,
    ) -> tuple[Float[Tensor, "batch k_plus head d_head"], Float[Tensor, "batch k_plus head d_head"],
               Float[Tensor, "#batch #head #q_pos k_plus"] | None]:
        """Append the learned bias_k/bias_v position, then the zero-attention position, as torch does."""
        n_batch = k.shape[0]
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.reshape(1, 1, self.num_heads, self.head_dim).expand(n_batch, -1, -1, -1)], 1)
            v = torch.cat([v, self.bias_v.reshape(1, 1, self.num_heads, self.head_dim).expand(n_batch, -1, -1, -1)], 1)
            mask = None if mask is None else F.pad(mask, (0, 1))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n_batch, 1, self.num_heads, self.head_dim)], 1)
            v = torch.cat([v, v.new_zeros(n_batch, 1, self.num_heads, self.head_dim)], 1)
            mask = None if mask is None else F.pad(mask, (0, 1))
        return k, v, mask

    def _explicit_attention(
        self, q: Float[Tensor, "batch q_pos head d_head"], k: Float[Tensor, "batch k_pos head d_head"],
        v: Float[Tensor, "batch k_pos head d_head"], mask: Additive | None, dropout: float,
    ) -> tuple[Float[Tensor, "batch q_pos head d_head"], Float[Tensor, "batch head q_pos k_pos"]]:
        """Scores, pattern and z materialised, with their hooks; returns z and the (dropped-out) pattern."""
        scores = einops.einsum(
            q * (1.0 / math.sqrt(self.head_dim)), k, "batch q_pos head d_head, batch k_pos head d_head -> batch head q_pos k_pos"
        )
        if mask is not None:
            scores = scores + mask
        scores = self.hook_attn_scores(scores)
        pattern = self.hook_pattern(_softmax_or_zeros(scores))
        if dropout > 0.0:
            pattern = F.dropout(pattern, p=dropout)
        z = einops.einsum(pattern, v, "batch head q_pos k_pos, batch k_pos head d_head -> batch q_pos head d_head")
        return z, pattern

    def _output(self, z: Float[Tensor, "batch q_pos head d_head"]) -> Float[Tensor, "batch q_pos d_model"]:
        weight, bias = self.out_proj.weight, self.out_proj.bias
        if self.use_attn_result or is_hooked(self.hook_result):
            # out_proj.weight is [d_model, head*d_head]; its transpose, split by head, is W_O [head d_head d_model].
            w_o = weight.T.unflatten(0, (self.num_heads, self.head_dim))
            result = self.hook_result(
                einops.einsum(z, w_o, "batch q_pos head d_head, head d_head d_model -> batch q_pos head d_model")
            )
            out = result.sum(dim=2)
            return out if bias is None else out + bias
        return F.linear(z.flatten(-2), weight, bias)


def _as_additive(mask: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    """nn.MultiheadAttention's mask as an additive float mask: bool True becomes -inf."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise ValueError(f"{name} must be bool (True = may not attend) or float (added to the scores); got {mask.dtype}")
    return mask.to(dtype)


def _causal_additive(n_queries: int, n_keys: int, dtype: torch.dtype, device: torch.device) -> Additive:
    """scaled_dot_product_attention's is_causal mask (query i sees keys 0..i), as an additive mask."""
    forbidden = torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(n_queries, n_keys, dtype=dtype, device=device).masked_fill(forbidden, float("-inf"))[None, None]


def _softmax_or_zeros(scores: Float[Tensor, "batch head q_pos k_pos"]) -> Float[Tensor, "batch head q_pos k_pos"]:
    """Softmax over keys; a row whose scores are all -inf (no key allowed) gives zeros, not NaN.

    The zero row matches what scaled_dot_product_attention gives such a query (and so what
    nn.MultiheadAttention returns with ``need_weights=False``); with ``need_weights=True`` torch
    returns NaN there.
    """
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
    return scores.masked_fill(dead, 0.0).softmax(dim=-1).masked_fill(dead, 0.0)
