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
class NormConfig:
    """A normalisation layer: LayerNorm (centre, then scale) or RMSNorm (scale only).

    ``weight``/``bias`` say whether a learned gain and bias are applied after normalising; weight
    processing folds them into the weights that read the norm's output and sets both to False.
    """

    kind: Literal["layernorm", "rmsnorm"]
    eps: float
    weight: bool = True
    bias: bool = True

    def __post_init__(self) -> None:
        if self.kind == "rmsnorm" and self.bias:
            raise ValueError("an RMSNorm has no bias: set bias=False")


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
    positions: LearnedPositions | Rotary
    attn_scale: float
    attn_scale_by_inverse_layer: bool = False
    gated_mlp: bool = False
    parallel_attn_mlp: bool = False
    processing: Processing = Processing()

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_head", "d_mlp", "d_vocab", "n_ctx"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if isinstance(self.positions, Rotary) and self.positions.n_rotary_dims > self.d_head:
            raise ValueError(
                f"n_rotary_dims={self.positions.n_rotary_dims} is larger than d_head={self.d_head}"
            )

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

    def replace(self, **changes: object) -> "ModelConfig":
        """A copy with some fields changed (the config is frozen)."""
        return dataclasses.replace(self, **changes)
