"""The model config: a frozen, typed description of one rebuilt transformer, with no sentinels."""

import dataclasses
from dataclasses import dataclass
from typing import Literal

ActFn = Literal["gelu_new", "gelu", "silu", "relu"]


@dataclass(frozen=True, kw_only=True)
class LearnedPositions:
    """Absolute learned position embeddings (GPT-2): ``W_pos [n_ctx d_model]`` added to the embedding."""

    n_ctx: int


@dataclass(frozen=True, kw_only=True)
class ShortformerPositions:
    """Learned absolute positions ``W_pos [n_ctx d_model]`` that reach attention only: each layer adds
    them to the input it projects into queries and keys (after ``ln1``), never to the values nor to
    the residual stream (Press et al. 2021, "Shortformer"; TransformerLens' ``"shortformer"``)."""

    n_ctx: int


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Rotary frequency scaling for long context (HF ``rope_parameters``; ``kind`` is HF's ``rope_type``).

    ``linear`` divides every frequency by ``factor``; ``llama3`` rescales the low frequencies only,
    blending between ``low_freq_factor`` and ``high_freq_factor`` wavelengths.
    """

    kind: Literal["linear", "llama3"]
    factor: float
    original_n_ctx: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None

    def __post_init__(self) -> None:
        if self.kind == "llama3" and None in (self.original_n_ctx, self.low_freq_factor, self.high_freq_factor):
            raise ValueError("llama3 rope scaling needs original_n_ctx, low_freq_factor and high_freq_factor")


@dataclass(frozen=True, kw_only=True)
class Rotary:
    """Rotary position embeddings applied to q and k inside attention.

    ``pairing="halves"`` rotates dimension i with i + n_rotary_dims/2 (HF ``rotate_half``);
    ``"interleaved"`` rotates 2i with 2i+1 (GPT-J, Meta's complex pairs).
    """

    n_rotary_dims: int
    base: float = 10_000.0
    pairing: Literal["halves", "interleaved"] = "halves"
    scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        if self.n_rotary_dims <= 0 or self.n_rotary_dims % 2:
            raise ValueError(f"n_rotary_dims={self.n_rotary_dims} must be a positive even number")


@dataclass(frozen=True, kw_only=True)
class Alibi:
    """ALiBi (BLOOM, Falcon-RW): no position embedding; each head adds ``slope * k_pos`` to its scores.

    Slopes are the geometric sequence of the ALiBi paper for ``n_heads`` (HF ``build_alibi_tensor``).
    ``scaled_with_scores=False`` adds the bias after the attention scale, ``q.k * attn_scale + bias``;
    True adds it before, ``(q.k + bias) * attn_scale``. ``bias_dtype="bfloat16"`` rounds each slope,
    then each ``slope * k_pos``, to bfloat16 before use; ``"float32"`` keeps them in float32.
    """

    scaled_with_scores: bool = False
    bias_dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass(frozen=True, kw_only=True)
class NormConfig:
    """A normalisation layer: LayerNorm (centre, then scale) or RMSNorm (scale only).

    ``weight``/``bias`` say whether a learned gain and bias are applied after normalising; weight
    processing folds them into the weights that read the norm's output and sets both to False.
    The gain applied is ``weight_offset + w`` (Gemma stores ``w`` around 0 and uses ``1 + w``).
    ``gain_dtype="float32"`` applies the gain before casting back to the input dtype (Gemma);
    ``"input"`` casts first (LLaMA). Both are the same in float32.
    """

    kind: Literal["layernorm", "rmsnorm"]
    eps: float
    weight: bool = True
    bias: bool = True
    weight_offset: float = 0.0
    gain_dtype: Literal["input", "float32"] = "input"

    def __post_init__(self) -> None:
        if self.kind == "rmsnorm" and self.bias:
            raise ValueError("an RMSNorm has no bias: set bias=False")


@dataclass(frozen=True, kw_only=True)
class QKNorm:
    """A norm on queries and keys after their projection, before rotary (Qwen3, Gemma 3, OLMo-2, Cohere).

    ``over="head"`` normalises each head's ``d_head`` vector; ``"all_heads"`` normalises the whole
    ``head * d_head`` projection at once (OLMo-2). Gains are stored per head, ``[head d_head]``.
    """

    norm: NormConfig
    over: Literal["head", "all_heads"] = "head"


@dataclass(frozen=True, kw_only=True)
class MoE:
    """A sparse mixture-of-experts MLP (Mixtral): a router picks ``top_k`` of ``n_experts`` gated
    MLPs per token and mixes their outputs with the softmax weights of the chosen ones."""

    n_experts: int
    top_k: int

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..n_experts={self.n_experts}")


@dataclass(frozen=True, kw_only=True)
class Processing:
    """Which weight-processing steps have been applied to the weights this config describes."""

    fold_ln: bool = False
    center_writing_weights: bool = False
    center_unembed: bool = False
    fold_value_biases: bool = False
    refactor_factored_attn_matrices: bool = False


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything the components need to build and run one model.

    Field names follow TransformerLens (``d_model``, ``n_heads``, ``d_mlp``...), so its users need no
    lookup table. ``hf_architecture`` is provenance only: components never read it.
    """

    hf_architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    norm: NormConfig
    act_fn: ActFn
    positions: LearnedPositions | ShortformerPositions | Rotary | Alibi | None  # None: no positional information
    attn_scale: float
    attn_scale_by_inverse_layer: bool = False
    causal: bool = True                            # False: bidirectional attention (encoders)
    gated_mlp: bool = False
    parallel_attn_mlp: bool = False
    # Where the block's norms sit. "pre": x + f(norm(x)). "sandwich": x + post_norm(f(norm(x)))
    # (Gemma 2/3). "output": x + post_norm(f(x)) (OLMo-2). "post_residual": norm(x + f(x)) (OPT-350m).
    # "normed_residual": norm(x) + f(norm(x)), the norm's output replaces the residual (BLOOM's
    # apply_residual_connection_post_layernorm).
    block_norms: Literal["pre", "sandwich", "output", "post_residual", "normed_residual"] = "pre"
    post_norm: NormConfig | None = None            # the ln1_post / ln2_post norms of sandwich and output
    final_norm: bool = True                        # ln_final before the unembedding
    embed_scale: float | None = None               # multiply token embeddings by this (Gemma: sqrt(d_model))
    embed_norm: NormConfig | None = None           # a norm right after the embedding (BLOOM)
    qk_norm: QKNorm | None = None
    # Per-layer overrides, each a tuple of n_layers entries.
    layer_rotary: tuple[Rotary | None, ...] | None = None  # rotary per layer; None entries: no rotary there
    # Sliding window per layer: keys with q_pos - k_pos < window (|q_pos - k_pos| < window when not causal).
    attn_windows: tuple[int | None, ...] | None = None
    attn_scores_soft_cap: float | None = None      # scores = cap * tanh(scores / cap) before masking
    clip_qkv: float | None = None                  # clamp q, k, v to [-clip_qkv, clip_qkv] after projection
    output_logits_soft_cap: float | None = None    # logits = cap * tanh(logits / cap)
    moe: MoE | None = None
    attn_only: bool = False                        # blocks without an MLP (d_mlp is then unused)
    processing: Processing = Processing()

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_head", "d_mlp", "d_vocab", "n_ctx"):
            if getattr(self, name) <= 0 and not (name == "d_mlp" and self.attn_only):
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        rotaries = [self.positions] if isinstance(self.positions, Rotary) else []
        rotaries += [r for r in self.layer_rotary or () if r is not None]
        for rotary in rotaries:
            if rotary.n_rotary_dims > self.d_head:
                raise ValueError(f"n_rotary_dims={rotary.n_rotary_dims} is larger than d_head={self.d_head}")
        for name in ("layer_rotary", "attn_windows"):
            per_layer = getattr(self, name)
            if per_layer is not None and len(per_layer) != self.n_layers:
                raise ValueError(f"{name} has {len(per_layer)} entries for {self.n_layers} layers")
        if self.layer_rotary is not None and not isinstance(self.positions, Rotary):
            raise ValueError("layer_rotary needs positions=Rotary(...)")
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            raise ValueError(f"clip_qkv={self.clip_qkv} must be positive")
        if any(w is not None and w <= 0 for w in self.attn_windows or ()):
            raise ValueError(f"attn_windows must be positive, got {self.attn_windows}")
        needs_post = self.block_norms in ("sandwich", "output")
        if needs_post != (self.post_norm is not None):
            raise ValueError(f"block_norms={self.block_norms!r} {'needs' if needs_post else 'takes no'} post_norm")
        if self.parallel_attn_mlp and self.block_norms != "pre":
            raise ValueError("a parallel attention+MLP block supports block_norms='pre' only")
        if self.attn_only and (self.moe is not None or self.parallel_attn_mlp or self.block_norms != "pre"):
            raise ValueError("an attention-only model has pre-norm sequential blocks without MoE")
        if self.moe is not None and not self.gated_mlp:
            raise ValueError("mixture-of-experts MLPs are gated: set gated_mlp=True")

    @property
    def n_key_value_heads(self) -> int:
        """TransformerLens' name for ``n_kv_heads``."""
        return self.n_kv_heads

    @property
    def group_size(self) -> int:
        """How many query heads share one key/value head (1 for multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def normalization_type(self) -> str:
        """TransformerLens' name for the norm kind: ``LN``/``RMS``, or ``LNPre``/``RMSPre`` once folded."""
        base = "LN" if self.norm.kind == "layernorm" else "RMS"
        return base if self.norm.weight else base + "Pre"

    def rotary_at(self, layer: int) -> Rotary | None:
        """The rotary embedding block ``layer`` applies, if any."""
        if self.layer_rotary is not None:
            return self.layer_rotary[layer]
        return self.positions if isinstance(self.positions, Rotary) else None

    def window_at(self, layer: int) -> int | None:
        """The sliding-window size of block ``layer``, or None for attention over every key."""
        return self.attn_windows[layer] if self.attn_windows is not None else None

    def replace(self, **changes: object) -> "ModelConfig":
        """A copy with some fields changed (the config is frozen)."""
        return dataclasses.replace(self, **changes)
