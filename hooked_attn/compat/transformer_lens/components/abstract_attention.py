"""``transformer_lens.components.abstract_attention``: TransformerLens' stand-alone attention module.

TransformerLens users build their own models from ``transformer_lens.components``; this module gives
them its attention with its surface: ``forward(query_input, key_input, value_input, ...)``,
``calculate_qkv_matrices``, ``apply_causal_mask``, ``apply_rotary`` with a rotary table that starts
at ``min(n_ctx, 2048)`` rows and grows on demand, an empty ``mask`` buffer (masks are built per call),
Qwen-1's log-n query scaling and dynamic-NTK rotary base (eval mode only), 4-bit (bitsandbytes)
projections. hooked_attn's own models do not use it (they use ``hooked_attn.components.attention``);
the equations are the same: scores ``q.k / attn_scale``, causal (and sliding-window) masking with
``-inf``, softmax, ``z = pattern @ v``, ``out = z W_O + b_O``.
"""

import math
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from hooked_attn.compat.errors import CompatError
from hooked_attn.components.alibi import alibi_slopes
from hooked_attn.compat.transformer_lens.HookedTransformerConfig import HookedTransformerConfig
from hooked_attn.compat.transformer_lens.utilities.attention import complex_attn_linear, simple_attn_linear
from hooked_attn.hook_points import HookPoint

try:  # 4-bit weights need bitsandbytes; read at call time, so tests may substitute them
    import bitsandbytes as bnb
    from bitsandbytes.nn.modules import Params4bit
except ImportError:
    bnb, Params4bit = None, None

INITIAL_ROTARY_ROWS = 2048  # the rotary table starts this long (or n_ctx if shorter) and doubles on demand


class AbstractAttention(nn.Module):
    """Attention with TransformerLens' config, parameters, buffers and method names (see the module doc).

    Parameters start at zero (biases stay zero): a model-level init or ``load_state_dict`` fills them.
    Subclasses decide the key/value weights (``Attention``: one per head; ``GroupedQueryAttention``: one
    per key/value head).
    """

    def __init__(self, cfg: HookedTransformerConfig | dict[str, Any], attn_type: str = "global",
                 layer_id: int | None = None) -> None:
        super().__init__()
        self.cfg = HookedTransformerConfig.unwrap(cfg)
        if attn_type not in ("global", "local"):
            raise ValueError(f"attn_type must be 'global' or 'local', got {attn_type!r}")
        if attn_type == "local" and self.cfg.window_size is None:
            raise ValueError("attn_type='local' needs cfg.window_size")
        if self.cfg.load_in_4bit:  # never a silently full-precision module
            raise ValueError("this attention is built in full precision: construct it with load_in_4bit=False, then "
                             "assign bitsandbytes Params4bit weights (W_Q/W_K/W_V) and set cfg.load_in_4bit=True")
        self.attn_type, self.layer_id = attn_type, layer_id
        c, dtype = self.cfg, self.cfg.dtype
        self.W_Q = nn.Parameter(torch.zeros(c.n_heads, c.d_model, c.d_head, dtype=dtype))
        self.W_O = nn.Parameter(torch.zeros(c.n_heads, c.d_head, c.d_model, dtype=dtype))
        self.b_Q = nn.Parameter(torch.zeros(c.n_heads, c.d_head, dtype=dtype))
        self.b_O = nn.Parameter(torch.zeros(c.d_model, dtype=dtype))
        # TransformerLens kept an [n_ctx n_ctx] causal mask here; it is built per call now, and a
        # legacy full mask in a state dict is accepted and dropped (see _load_from_state_dict).
        self.register_buffer("mask", torch.zeros(0, 0, dtype=torch.bool))
        self.register_buffer("IGNORE", torch.tensor(-torch.inf))
        self.attn_scale = c.attn_scale if c.use_attn_scale else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            self.attn_scale *= (layer_id or 0) + 1
        self.rotary_base = float(c.rotary_base_local if attn_type == "local" and c.rotary_base_local is not None
                                 else c.rotary_base)
        if c.positional_embedding_type == "rotary":
            assert c.rotary_dim is not None
            sin, cos = self.calculate_sin_cos_rotary(c.rotary_dim, min(c.n_ctx, INITIAL_ROTARY_ROWS),
                                                     base=self.rotary_base, dtype=dtype)
            self.register_buffer("rotary_sin", sin)
            self.register_buffer("rotary_cos", cos)
            self._table_base = self.rotary_base
        self.hook_k, self.hook_q, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_z, self.hook_attn_scores, self.hook_pattern = HookPoint(), HookPoint(), HookPoint()
        self.hook_result = HookPoint()
        if c.positional_embedding_type == "rotary":
            self.hook_rot_k, self.hook_rot_q = HookPoint(), HookPoint()

    # ----- the derived buffers: never loaded, always rebuilt from the config -----

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name in ("mask", "rotary_sin", "rotary_cos"):
            if prefix + name in state_dict and hasattr(self, name):
                state_dict[prefix + name] = getattr(self, name)  # a legacy full-size table: keep ours
        super()._load_from_state_dict(state_dict, prefix, *args)

    # ----- projections -----

    def _key_value_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def _project(self, x: Tensor, w: Any, b: Tensor) -> Float[Tensor, "batch pos head d_head"]:
        if self.cfg.load_in_4bit and Params4bit is not None and isinstance(w, Params4bit):
            if x.ndim == 3:  # one input for every head: a single 4-bit matmul
                flat = bnb.matmul_4bit(x, w.t(), bias=None, quant_state=w.quant_state)
                return einops.rearrange(flat, "batch pos (head d_head) -> batch pos head d_head", head=b.shape[0]) + b
            full = bnb.functional.dequantize_4bit(w.data, w.quant_state)  # split inputs: dequantize once
            w = einops.rearrange(full, "(head d_head) d_model -> head d_model d_head", head=b.shape[0])
        return complex_attn_linear(x, w, b) if x.ndim == 4 else simple_attn_linear(x, w, b)

    def calculate_qkv_matrices(self, query_input: Tensor, key_input: Tensor, value_input: Tensor,
                               ) -> tuple[Tensor, Tensor, Tensor]:
        """``q, k, v`` ``[batch pos head d_head]``; inputs are ``[batch pos d_model]``, or
        ``[batch pos head d_model]`` (one per head) with ``use_split_qkv_input``."""
        W_K, b_K, W_V, b_V = self._key_value_weights()
        return (self._project(query_input, self.W_Q, self.b_Q), self._project(key_input, W_K, b_K),
                self._project(value_input, W_V, b_V))

    # ----- rotary -----

    @staticmethod
    def calculate_sin_cos_rotary(rotary_dim: int, n_ctx: int, base: float = 10000.0,
                                 dtype: torch.dtype = torch.float32, adjacent_pairs: bool = False,
                                 ) -> tuple[Float[Tensor, "pos rotary_dim"], Float[Tensor, "pos rotary_dim"]]:
        """``sin, cos`` ``[n_ctx rotary_dim]`` of ``pos * base^(-2i/rotary_dim)``: frequency ``i`` fills
        columns ``i`` and ``i + rotary_dim/2`` (halves, GPT-NeoX) or ``2i, 2i+1`` (adjacent pairs, GPT-J)."""
        inv_freq = base ** (-torch.arange(0, rotary_dim // 2, dtype=torch.float64) / (rotary_dim / 2))
        angles = torch.arange(n_ctx, dtype=torch.float64)[:, None] * inv_freq[None, :]
        angles = angles.repeat_interleave(2, dim=-1) if adjacent_pairs else torch.cat([angles, angles], dim=-1)
        return angles.sin().to(dtype), angles.cos().to(dtype)

    def _set_rotary_table(self, n_rows: int, base: float) -> None:
        sin, cos = self.calculate_sin_cos_rotary(self.cfg.rotary_dim, n_rows, base=base, dtype=self.rotary_sin.dtype,
                                                 adjacent_pairs=self.cfg.rotary_adjacent_pairs)
        self.rotary_sin, self.rotary_cos = sin.to(self.rotary_sin.device), cos.to(self.rotary_cos.device)
        self._table_base = base

    def _extend_rotary_embeddings(self, new_size: int) -> None:
        """Rebuild the rotary table with ``new_size`` rows (same base)."""
        self._set_rotary_table(new_size, self._table_base)

    def _ensure_rotary_rows(self, needed: int) -> None:
        rows = self.rotary_sin.shape[0]
        if needed > rows:  # double (up to n_ctx) so that token-by-token generation rarely rebuilds
            self._extend_rotary_embeddings(max(needed, min(2 * rows, self.cfg.n_ctx)))

    def _rotate(self, x: Tensor) -> Tensor:
        if self.cfg.rotary_adjacent_pairs:
            pairs = einops.rearrange(x, "... (d two) -> ... d two", two=2)
            return einops.rearrange(torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1), "... d two -> ... (d two)")
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

    def apply_rotary(self, x: Float[Tensor, "batch pos head d_head"], past_kv_pos_offset: int = 0,
                     attention_mask: Int[Tensor, "batch offset_pos"] | None = None) -> Float[Tensor, "batch pos head d_head"]:
        """Rotate the first ``rotary_dim`` features of ``x`` by its absolute positions (``past_kv_pos_offset``
        onwards; with an ``attention_mask`` over cached and new positions, counting real tokens only)."""
        n_pos, rotary_dim = x.shape[1], self.cfg.rotary_dim
        self._ensure_rotary_rows(past_kv_pos_offset + n_pos)
        if attention_mask is None:
            positions = torch.arange(past_kv_pos_offset, past_kv_pos_offset + n_pos, device=x.device)[None, :]
        else:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_kv_pos_offset:].to(x.device)
        sin = self.rotary_sin.to(x.device)[positions][:, :, None, :]
        cos = self.rotary_cos.to(x.device)[positions][:, :, None, :]
        rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
        rotated = rot * cos.to(x.dtype) + self._rotate(rot) * sin.to(x.dtype)
        return torch.cat([rotated, rest], dim=-1)

    @staticmethod
    def _ntk_alpha(seq_len: int, train_len: int) -> float:
        """Qwen-1's dynamic-NTK step: ``2^ceil(log2(seq_len / train_len) + 1) - 1``, at least 1."""
        return max(2 ** math.ceil(math.log2(seq_len / train_len) + 1) - 1, 1.0)

    def _rescale_rotary_for_ntk(self, seq_len: int) -> None:
        """Rebuild the table with base ``rotary_base * alpha^(rotary_dim / (rotary_dim - 2))`` for this
        length (alpha 1, the plain base, at or below the training length)."""
        train_len = self.cfg.train_seq_length
        if train_len is None:
            raise ValueError("use_dynamic_ntk_rope needs cfg.train_seq_length")
        dim = self.cfg.rotary_dim
        base = self.rotary_base * self._ntk_alpha(seq_len, train_len) ** (dim / (dim - 2))
        if base != self._table_base:
            self._set_rotary_table(self.rotary_sin.shape[0], base)

    def _apply_logn_scaling(self, q: Float[Tensor, "batch pos head d_head"], kv_cache_pos_offset: int = 0,
                            ) -> Float[Tensor, "batch pos head d_head"]:
        """Qwen-1's log-n scaling: the query at (1-based) position ``p`` past the training length is
        multiplied by ``log(p) / log(train_seq_length)``."""
        train_len = self.cfg.train_seq_length
        if train_len is None:
            raise ValueError("use_logn_attn needs cfg.train_seq_length")
        positions = torch.arange(kv_cache_pos_offset + 1, kv_cache_pos_offset + q.shape[1] + 1, dtype=torch.float64)
        scale = torch.where(positions > train_len, positions.log() / math.log(train_len), 1.0)
        return q * scale.to(q.dtype).to(q.device)[None, :, None, None]

    # ----- masking -----

    def apply_causal_mask(self, attn_scores: Float[Tensor, "batch head q_pos k_pos"], past_kv_pos_offset: int = 0,
                          attention_mask: Int[Tensor, "batch k_pos"] | None = None,
                          ) -> Float[Tensor, "batch head q_pos k_pos"]:
        """Scores with ``-inf`` wherever a query (at absolute position ``past_kv_pos_offset + i``) may not
        look: later keys, keys beyond ``window_size`` for a local layer, padding (``attention_mask`` 0)."""
        n_q, n_k = attn_scores.shape[-2:]
        if past_kv_pos_offset + n_q != n_k:
            raise ValueError(f"{n_q} queries after {past_kv_pos_offset} cached positions need {past_kv_pos_offset + n_q} "
                             f"keys, got {n_k}")
        q_pos = torch.arange(past_kv_pos_offset, past_kv_pos_offset + n_q, device=attn_scores.device)[:, None]
        k_pos = torch.arange(n_k, device=attn_scores.device)[None, :]
        allowed = k_pos <= q_pos
        if self.attn_type == "local":
            allowed = allowed & (q_pos - k_pos < self.cfg.window_size)
        allowed = allowed[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool().to(attn_scores.device)[:, None, None, :]
        return torch.where(allowed, attn_scores, self.IGNORE.to(attn_scores.dtype))

    # ----- ALiBi -----

    @staticmethod
    def create_alibi_slope(n_ctx: int, device: torch.device | str | None = None) -> Tensor:
        """``[query key]``: ``min(key - query, 0)``, the distance back from each query (0 ahead of it)."""
        pos = torch.arange(n_ctx, device=device, dtype=torch.float32)
        return (pos[None, :] - pos[:, None]).clamp(max=0)

    @staticmethod
    def create_alibi_multipliers(n_heads: int, device: torch.device | str | None = None) -> Tensor:
        """Each head's ALiBi slope (hooked_attn's ``alibi_slopes``, as HF builds them)."""
        return alibi_slopes(n_heads).to(device)

    @staticmethod
    def create_alibi_bias(n_heads: int, n_ctx: int, device: torch.device | str | None = None) -> Tensor:
        """``[head query key]``: each head's slope times ``create_alibi_slope``."""
        slope = AbstractAttention.create_alibi_slope(n_ctx, device)
        return AbstractAttention.create_alibi_multipliers(n_heads, device)[:, None, None] * slope

    # ----- forward -----

    def _expand_kv(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return k, v

    def forward(self, query_input: Tensor, key_input: Tensor, value_input: Tensor,
                past_kv_cache_entry: Any = None, additional_attention_mask: Tensor | None = None,
                attention_mask: Int[Tensor, "batch offset_pos"] | None = None, position_bias: Tensor | None = None,
                ) -> Float[Tensor, "batch pos d_model"]:
        """``[batch pos d_model]``. ``past_kv_cache_entry`` (a ``TransformerLensKeyValueCacheEntry``) holds
        earlier keys/values and receives these; ``attention_mask`` marks real tokens (1) over cached and
        new positions; ``additional_attention_mask`` is added to the scores; ``position_bias``
        ``[head q_pos k_pos]`` too (ALiBi, when not given, is built from the config)."""
        c = self.cfg
        for name, given in (("query_input", query_input), ("key_input", key_input), ("value_input", value_input)):
            if given.shape[-1] != c.d_model:
                raise CompatError(f"{name} has shape {tuple(given.shape)}: its last axis must be d_model={c.d_model}")
        q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)
        if c.clip_qkv is not None:
            q, k, v = (t.clamp(min=-c.clip_qkv, max=c.clip_qkv) for t in (q, k, v))
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        offset = 0 if past_kv_cache_entry is None else past_kv_cache_entry.past_keys.shape[1]
        if c.positional_embedding_type == "rotary":
            if c.use_dynamic_ntk_rope:  # eval only; training keeps (or returns to) the plain base
                self._rescale_rotary_for_ntk(offset + q.shape[1] if not self.training else c.train_seq_length or 1)
            q = self.hook_rot_q(self.apply_rotary(q, offset, attention_mask))
            k = self.hook_rot_k(self.apply_rotary(k, offset, attention_mask))
        if c.use_logn_attn and not self.training:
            q = self._apply_logn_scaling(q, offset)
        if past_kv_cache_entry is not None:
            k, v = past_kv_cache_entry.append(k, v)
        k, v = self._expand_kv(k, v)
        scores = einops.einsum(q, k, "batch q_pos head d_head, batch k_pos head d_head -> batch head q_pos k_pos")
        scores = scores / self.attn_scale
        if c.attn_scores_soft_cap > 0:
            scores = c.attn_scores_soft_cap * torch.tanh(scores / c.attn_scores_soft_cap)
        if c.positional_embedding_type == "alibi" and position_bias is None:
            n_k = scores.shape[-1]
            position_bias = self.create_alibi_bias(c.n_heads, n_k, scores.device)[:, -scores.shape[-2]:, :]
        if position_bias is not None:
            scores = scores + position_bias.to(scores.dtype)
        if c.attention_dir == "causal":
            scores = self.apply_causal_mask(scores, offset, attention_mask)
        elif attention_mask is not None:
            scores = torch.where(attention_mask.bool()[:, None, None, :], scores, self.IGNORE.to(scores.dtype))
        if additional_attention_mask is not None:
            scores = scores + additional_attention_mask
        scores = self.hook_attn_scores(scores)
        pattern = scores.softmax(dim=-1, dtype=torch.float32).nan_to_num(0.0).to(v.dtype)  # all-masked rows: 0
        pattern = self.hook_pattern(pattern)
        z = self.hook_z(einops.einsum(pattern, v, "batch head q_pos k_pos, batch k_pos head d_head -> batch q_pos head d_head"))
        if c.use_attn_result:
            result = self.hook_result(einops.einsum(z, self.W_O, "batch pos head d_head, head d_head d_model -> batch pos head d_model"))
            return result.sum(-2) + self.b_O
        return einops.einsum(z, self.W_O, "batch pos head d_head, head d_head d_model -> batch pos d_model") + self.b_O


__all__ = ["AbstractAttention"]
