"""Multi-head, grouped-query and multi-query self-attention with a hook at every site.

Mirrors HF ``LlamaAttention``/``GPT2Attention`` with ``eager_attention_forward``. Two paths give the
same result: the explicit one materialises scores and pattern, the fused one calls
``scaled_dot_product_attention``; the fused path runs only when nothing hooks the scores or pattern.
"""

from dataclasses import dataclass, field

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from hooked_attn.components.alibi import alibi_bias
from hooked_attn.components.kv_cache import KVCache
from hooked_attn.components.norms import HeadNorm
from hooked_attn.components.params import strided_parameter
from hooked_attn.components.rotary import RopeTables, apply_rotary, rope_tables
from hooked_attn.config import Alibi, ModelConfig
from hooked_attn.hook_points import HookPoint, is_hooked

AttendMask = Bool[Tensor, "#batch 1 #q_pos k_pos"]  # batch and q_pos may broadcast


@dataclass
class AttentionContext:
    """What every attention layer of one forward pass shares, built once per forward by ``build``.

    ``attend`` is True where a query may see a key (None: plain causal, queries aligned to the last
    keys, or no restriction for a bidirectional model); ``positions`` are the queries' positions,
    ``key_positions`` every key's (cached ones too); ``rope_cache`` holds cos/sin tables computed
    once per forward; ``kv_cache`` receives this forward's keys and values. ``attend_for(window)``
    is the one place a layer's mask is decided, made once per window and shared by every layer.
    ``query_key_pos`` is what every layer adds to its query and key inputs (shortformer positions).
    """

    attend: AttendMask | None
    positions: Int[Tensor, "batch q_pos"]
    key_positions: Int[Tensor, "batch k_pos"]
    rope_cache: RopeTables = field(default_factory=dict)
    kv_cache: KVCache | None = None
    causal: bool = True
    masks: dict[int | None, AttendMask | None] = field(default_factory=dict)
    query_key_pos: Float[Tensor, "batch q_pos d_model"] | None = None

    @classmethod
    def build(
        cls, batch: int, n_new: int, device: torch.device, mask: Tensor | None, *, causal: bool, n_cached: int = 0,
        kv_cache: KVCache | None = None, real_positions: bool = True, padding_sees_itself: bool = True,
    ) -> "AttentionContext":
        """Positions and the attend mask for ``n_new`` queries after ``n_cached`` cached keys.

        Args:
            mask: ``[batch n_cached+n_new]``, 1 for real tokens, 0 for padding (None: all real).
                Padding keys are never attended to.
            real_positions: positions count real tokens only (left padding does not shift them);
                otherwise they are the absolute indices (BERT).
            padding_sees_itself: a padding query also sees its own position, so a causal row with
                nothing before it stays finite (its output is unused).
        """
        n_keys = n_cached + n_new
        absolute = torch.arange(n_keys, device=device).expand(batch, n_keys)
        if mask is None:
            return cls(attend=None, positions=absolute[:, n_cached:], key_positions=absolute, kv_cache=kv_cache,
                       causal=causal)
        valid = mask.to(device).bool()
        keys = (valid.long().cumsum(-1) - 1).clamp(min=0) if real_positions else absolute
        attend = valid[:, None, :].expand(-1, n_new, -1)  # bidirectional: every real key
        if causal:
            attend = attend & torch.ones(n_new, n_keys, dtype=torch.bool, device=device).tril(n_cached)[None]
        if padding_sees_itself:
            rows = torch.arange(n_new, device=device)
            own = torch.zeros(n_new, n_keys, dtype=torch.bool, device=device)
            own[rows, n_cached + rows] = True  # each query's own position
            attend = attend | (own[None] & ~valid[:, n_cached:, None])
        return cls(attend=attend[:, None], positions=keys[:, n_cached:], key_positions=keys, kv_cache=kv_cache,
                   causal=causal)

    def attend_for(self, window: int | None, q_len: int, k_len: int) -> AttendMask | None:
        """The mask a layer with this sliding ``window`` (None: full attention) uses; None is plain
        causal with queries aligned to the last keys (or no restriction when bidirectional)."""
        if window not in self.masks:
            attend = self.attend
            device = self.positions.device
            if attend is None and self.causal and 1 < q_len < k_len:
                attend = causal_mask(q_len, k_len, device)  # SDPA's is_causal aligns top-left
            if window is not None:
                attend = sliding_window(attend, q_len, k_len, window, device, self.causal)
            self.masks[window] = attend
        return self.masks[window]


class Attention(nn.Module):
    """Self-attention in the per-head layout: ``W_Q [head d_model d_head]``, ``W_K``/``W_V
    [kv_head d_model d_head]``, ``W_O [head d_head d_model]``, biases always present (zeros where
    the family has none)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        h, kv, d, m = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model
        self.W_Q = strided_parameter((h, d, m), (0, 2, 1))
        self.W_K = strided_parameter((kv, d, m), (0, 2, 1))
        self.W_V = strided_parameter((kv, d, m), (0, 2, 1))
        self.W_O = strided_parameter((m, h, d), (1, 2, 0))
        self.b_Q = nn.Parameter(torch.empty(h, d))
        self.b_K = nn.Parameter(torch.empty(kv, d))
        self.b_V = nn.Parameter(torch.empty(kv, d))
        self.b_O = nn.Parameter(torch.empty(m))
        self.rotary = cfg.rotary_at(layer)
        self.window = cfg.window_at(layer)
        self.alibi = cfg.positions if isinstance(cfg.positions, Alibi) else None
        self.clip_qkv = cfg.clip_qkv
        self.soft_cap = cfg.attn_scores_soft_cap
        self.scale = cfg.attn_scale / (layer + 1 if cfg.attn_scale_by_inverse_layer else 1)
        self.use_attn_result = False
        self.ungroup_grouped_query_attention = False  # hook_k/hook_v per query head
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        if cfg.qk_norm is not None:
            self.q_norm = HeadNorm(cfg.qk_norm, h, d)
            self.k_norm = HeadNorm(cfg.qk_norm, kv, d)
        if self.rotary is not None:
            self.hook_rot_q = HookPoint()
            self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()
        self.hook_result = HookPoint(opt_in=True)  # computed when use_attn_result or hooked

    def _project(self, x: Tensor, W: Tensor, b: Tensor, ungroup: bool = False) -> Tensor:
        """``x`` ``[batch pos d_model]``, or one input per head ``[batch pos n d_model]`` (split inputs)."""
        group = self.cfg.group_size if ungroup else 1  # K/V heads repeated to the query heads they serve
        if x.ndim == 4:
            if group > 1:
                W, b = W.repeat_interleave(group, dim=0), b.repeat_interleave(group, dim=0)
            if x.shape[2] != W.shape[0]:
                raise ValueError(f"a split attention input has {x.shape[2]} heads where {W.shape[0]} are expected")
            return einops.einsum(x, W, "batch pos head d_model, head d_model d_head -> batch pos head d_head") + b
        # W is [head d_model d_head] over [head d_head d_model] storage: the flatten below is a view.
        weight = W.transpose(1, 2).reshape(-1, W.shape[1])
        out = F.linear(x, weight, b.flatten()).unflatten(-1, (W.shape[0], W.shape[2]))
        return out.repeat_interleave(group, dim=2) if group > 1 else out

    def forward(
        self, x: Float[Tensor, "batch pos d_model"] | Float[Tensor, "batch pos head d_model"], ctx: AttentionContext,
        key_input: Tensor | None = None, value_input: Tensor | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``x`` is the query input, and the key and value input unless those are given (split inputs,
        one per head: ``[batch pos head d_model]`` for queries, ``[batch pos kv_head d_model]`` for keys
        and values, ``head`` when ungrouped). Shortformer positions are added to the query and key inputs."""
        key_input = x if key_input is None else key_input
        value_input = x if value_input is None else value_input
        if ctx.query_key_pos is not None:
            pos = ctx.query_key_pos
            x = x + (pos if x.ndim == 3 else pos[:, :, None])
            key_input = key_input + (pos if key_input.ndim == 3 else pos[:, :, None])
        ungroup = self.ungroup_grouped_query_attention and self.cfg.group_size > 1
        q = self._project(x, self.W_Q, self.b_Q)
        k = self._project(key_input, self.W_K, self.b_K, ungroup)
        v = self._project(value_input, self.W_V, self.b_V, ungroup)
        if self.clip_qkv is not None:
            # Clamped before the hooks, so hook_q/k/v hold exactly what attention uses (what HF's
            # query/key/value states hold); an edit made in a hook is not clamped again.
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.cfg.qk_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            cos, sin = rope_tables(self.rotary, ctx.positions, q.dtype, ctx.rope_cache)
            q = self.hook_rot_q(apply_rotary(q, cos, sin, self.rotary))
            k = self.hook_rot_k(apply_rotary(k, cos, sin, self.rotary))
        if ctx.kv_cache is not None:
            k, v = ctx.kv_cache.layers[self.layer].append(k, v)
        attend = ctx.attend_for(self.window, q.shape[1], k.shape[1])
        bias = None
        if self.alibi is not None:
            bias = alibi_bias(self.cfg.n_heads, ctx.key_positions, torch.float32, self.alibi)
        if is_hooked(self.hook_attn_scores) or is_hooked(self.hook_pattern) or self.soft_cap is not None:
            z = self._explicit_attention(q, k, v, attend, bias)
        else:
            z = self._fused_attention(q, k, v, attend, bias)
        z = self.hook_z(z)
        if self.use_attn_result or is_hooked(self.hook_result):
            result = self.hook_result(
                einops.einsum(z, self.W_O, "batch pos head d_head, head d_head d_model -> batch pos head d_model")
            )
            return result.sum(dim=2) + self.b_O
        w_o = self.W_O.permute(2, 0, 1).flatten(1)
        return F.linear(z.flatten(-2), w_o, self.b_O)

    def _explicit_attention(
        self, q: Float[Tensor, "batch q_pos head d_head"], k: Float[Tensor, "batch k_pos kv_head d_head"],
        v: Float[Tensor, "batch k_pos kv_head d_head"], attend: AttendMask | None, bias: Tensor | None,
    ) -> Float[Tensor, "batch q_pos head d_head"]:
        # Same operations in the same order as HF's eager_attention_forward (matmul, then scale; fp32
        # softmax), so that even bf16 results round identically.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        group = q.shape[1] // k.shape[1]  # 1 when ungrouped: k and v already have a head per query head
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3))
        if bias is None:
            scores = scores * self.scale
        elif self.alibi is not None and self.alibi.scaled_with_scores:
            scores = (scores + bias.to(scores.dtype)) * self.scale
        else:
            scores = scores * self.scale + bias.to(scores.dtype)
        if self.soft_cap is not None:
            scores = torch.tanh(scores / self.soft_cap) * self.soft_cap
        if attend is None and self.cfg.causal:
            attend = causal_mask(q.shape[2], k.shape[2], q.device)
        if attend is not None:
            scores = scores.masked_fill(~attend, torch.finfo(scores.dtype).min)
        scores = self.hook_attn_scores(scores)
        wide = torch.float64 if scores.dtype == torch.float64 else torch.float32  # HF: float32 softmax
        pattern = self.hook_pattern(scores.softmax(dim=-1, dtype=wide).to(v.dtype))
        return torch.matmul(pattern, v).transpose(1, 2)

    def _fused_attention(
        self, q: Float[Tensor, "batch q_pos head d_head"], k: Float[Tensor, "batch k_pos kv_head d_head"],
        v: Float[Tensor, "batch k_pos kv_head d_head"], attend: AttendMask | None, bias: Tensor | None,
    ) -> Float[Tensor, "batch q_pos head d_head"]:
        mask: Tensor | None = attend
        if bias is not None:
            if self.alibi is not None and self.alibi.scaled_with_scores:  # (q.k + bias) * scale
                bias = bias * self.scale
            if attend is None and self.cfg.causal:
                attend = causal_mask(q.shape[1], k.shape[1], q.device)
            mask = bias.to(q.dtype) if attend is None else bias.to(q.dtype).masked_fill(~attend, float("-inf"))
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            is_causal=mask is None and self.cfg.causal and q.shape[1] > 1, scale=self.scale, enable_gqa=k.shape[2] != q.shape[2],
        )
        return z.transpose(1, 2)


def sliding_window(
    attend: AttendMask | None, q_len: int, k_len: int, window: int, device: torch.device, causal: bool = True
) -> Bool[Tensor, "#batch 1 q_pos k_pos"]:
    """Restrict a causal mask to keys less than ``window`` positions back (HF ``sliding_window_overlay``);
    without ``causal``, to keys less than ``window`` positions away on either side."""
    q_idx = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_idx = torch.arange(k_len, device=device)[None, :]
    near = (q_idx - k_idx < window) & (k_idx <= q_idx) if causal else (q_idx - k_idx).abs() < window
    return near[None, None] if attend is None else attend & near


def causal_mask(q_len: int, k_len: int, device: torch.device) -> Bool[Tensor, "1 1 q_pos k_pos"]:
    """True where query i may attend to key j: j <= i, with queries aligned to the last keys."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)[None, None]
