"""TransformerLens' HookedTransformerConfig: its constructor arguments and derived fields, mapped to ModelConfig.

TransformerLens spells "absent" as ``-1`` or ``None`` and derives fields in ``__post_init__``; this
class keeps that surface for old code and converts it once, in ``to_model_config()``, to hooked_attn's
typed ``ModelConfig``. Options hooked_attn does not build raise a ValueError naming the option.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from hooked_attn.config import Alibi, LearnedPositions, ModelConfig, NormConfig, Rotary, ShortformerPositions

SUPPORTED_ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "silu", "solu", "solu_ln")
_ACT = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "silu": "silu"}
_NORMS = {
    "LN": NormConfig(kind="layernorm", eps=1e-5),
    "LNPre": NormConfig(kind="layernorm", eps=1e-5, weight=False, bias=False),
    "RMS": NormConfig(kind="rmsnorm", eps=1e-5, bias=False),
    "RMSPre": NormConfig(kind="rmsnorm", eps=1e-5, weight=False, bias=False),
}


@dataclass
class HookedTransformerConfig:
    """TransformerLens' model config. Build toy models with ``HookedTransformer(cfg)``."""

    n_layers: int
    d_model: int
    n_ctx: int
    d_head: int
    model_name: str = "custom"
    n_heads: int = -1
    d_mlp: int | None = None
    act_fn: str | None = None
    d_vocab: int = -1
    eps: float = 1e-5
    use_attn_result: bool = False
    use_attn_scale: bool = True
    attn_scale: float = -1.0
    use_split_qkv_input: bool = False
    use_hook_mlp_in: bool = False
    use_attn_in: bool = False
    use_local_attn: bool = False
    ungroup_grouped_query_attention: bool = False
    original_architecture: str | None = None
    from_checkpoint: bool = False
    checkpoint_index: int | None = None
    checkpoint_label_type: str | None = None
    checkpoint_value: int | None = None
    tokenizer_name: str | None = None
    window_size: int | None = None
    attn_types: list[str] | None = None
    init_mode: str = "gpt2"
    normalization_type: str | None = "LN"
    device: str | None = None
    n_devices: int = 1
    attention_dir: str = "causal"
    attn_only: bool = False
    seed: int | None = None
    initializer_range: float = -1.0
    init_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    positional_embedding_type: str = "standard"
    final_rms: bool = False
    d_vocab_out: int = -1
    parallel_attn_mlp: bool = False
    rotary_dim: int | None = None
    n_params: int | None = None
    use_hook_tokens: bool = False
    gated_mlp: bool = False
    default_prepend_bos: bool = True
    dtype: torch.dtype = torch.float32
    tokenizer_prepends_bos: bool | None = None
    n_key_value_heads: int | None = None
    post_embedding_ln: bool = False
    rotary_base: float = 10000.0
    trust_remote_code: bool = False
    rotary_adjacent_pairs: bool = False
    load_in_4bit: bool = False
    num_experts: int | None = None
    experts_per_token: int | None = None
    tie_word_embeddings: bool = False
    use_normalization_before_and_after: bool = False
    attn_scores_soft_cap: float = -1.0
    output_logits_soft_cap: float = -1.0
    use_qk_norm: bool = False
    clip_qkv: float | None = None
    rotary_base_local: float | None = None
    use_logn_attn: bool = False
    use_dynamic_ntk_rope: bool = False
    train_seq_length: int | None = None
    dtype_str: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.n_heads == -1:
            if self.d_model % self.d_head:
                raise ValueError(f"d_model={self.d_model} is not a multiple of d_head={self.d_head}: give n_heads")
            self.n_heads = self.d_model // self.d_head
        if self.seed is not None:
            torch.manual_seed(self.seed)
        if self.use_local_attn and (self.window_size is None or self.attn_types is None):
            raise ValueError("use_local_attn needs window_size and attn_types")
        if not self.attn_only:
            if self.d_mlp is None:
                self.d_mlp = 4 * self.d_model
            if self.act_fn is None:
                raise ValueError("act_fn must be given for a model with MLPs (attn_only=False)")
            if self.act_fn not in SUPPORTED_ACTIVATIONS:
                raise ValueError(f"act_fn={self.act_fn!r} is not one of {SUPPORTED_ACTIVATIONS}")
        if self.initializer_range < 0 and self.init_mode == "gpt2":
            self.initializer_range = 0.8 / math.sqrt(self.d_model)
        if self.initializer_range < 0:
            self.initializer_range = 0.02
        if self.d_vocab_out == -1:
            self.d_vocab_out = self.d_vocab
        if self.positional_embedding_type == "rotary" and self.rotary_dim is None:
            self.rotary_dim = self.d_head
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.use_attn_scale and self.attn_scale == -1.0:
            self.attn_scale = math.sqrt(self.d_head)
        self.n_params = self._count_params()

    def _count_params(self) -> int:
        """Weights in the blocks (attention and MLP matrices), as TransformerLens counts them."""
        kv = self.n_key_value_heads or self.n_heads
        attn = self.d_model * self.d_head * (2 * self.n_heads + 2 * kv)
        mlp = 0 if self.attn_only else self.d_model * (self.d_mlp or 0) * (3 if self.gated_mlp else 2)
        return self.n_layers * (attn + mlp)

    @classmethod
    def unwrap(cls, config: "HookedTransformerConfig | dict[str, Any]") -> "HookedTransformerConfig":
        """A config from itself or from a dict of constructor arguments."""
        return cls.from_dict(config) if isinstance(config, dict) else config

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "HookedTransformerConfig":
        return cls(**config_dict)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def is_layer_norm_activation(self) -> bool:
        return self.act_fn is not None and self.act_fn.endswith("_ln")

    def set_seed_everywhere(self, seed: int) -> None:
        torch.manual_seed(seed)

    def __repr__(self) -> str:
        return "HookedTransformerConfig:\n" + "\n".join(f"  {k}: {v!r}" for k, v in self.to_dict().items())

    def to_model_config(self) -> ModelConfig:
        """hooked_attn's ModelConfig for this config; raises ValueError for options it does not build."""
        self.refuse_unsupported()
        if self.d_vocab <= 0:
            raise ValueError(f"d_vocab={self.d_vocab}: give the vocabulary size")
        return self._model_config()

    def refuse_unsupported(self) -> None:
        """Raise a ValueError naming every option set here that hooked_attn's models do not build."""
        unsupported = {
            "act_fn in ('solu', 'solu_ln', 'gelu_fast')": (
                self.act_fn in ("solu", "solu_ln", "gelu_fast") and not self.attn_only),
            "final_rms": self.final_rms and self.normalization_type not in ("RMS", "RMSPre"),
            "use_qk_norm": self.use_qk_norm,
            "rotary_base_local": self.rotary_base_local is not None,
            "use_logn_attn / use_dynamic_ntk_rope": self.use_logn_attn or self.use_dynamic_ntk_rope,
            "num_experts": self.num_experts is not None,
            "normalization_type=None": self.normalization_type is None,
            "use_attn_in": self.use_attn_in,
        }
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"hooked_attn cannot build a model with {', '.join(bad)} (TransformerLens options)")

    def _model_config(self) -> ModelConfig:
        if self.normalization_type not in _NORMS:
            raise ValueError(f"normalization_type={self.normalization_type!r} is not one of {list(_NORMS)}")
        norm = dataclasses.replace(_NORMS[self.normalization_type], eps=self.eps)
        match self.positional_embedding_type:
            case "standard":
                positions: Any = LearnedPositions(n_ctx=self.n_ctx)
            case "shortformer":
                positions = ShortformerPositions(n_ctx=self.n_ctx)
            case "rotary":
                positions = Rotary(n_rotary_dims=int(self.rotary_dim or self.d_head), base=float(self.rotary_base),
                                   pairing="interleaved" if self.rotary_adjacent_pairs else "halves")
            case "alibi":
                positions = Alibi()
            case other:
                raise ValueError(f"positional_embedding_type={other!r} is not supported")
        windows = None
        if self.use_local_attn and self.attn_types is not None:
            windows = tuple(self.window_size if t == "local" else None
                            for t in (self.attn_types * self.n_layers)[: self.n_layers])
        return ModelConfig(
            hf_architecture=self.original_architecture or "HookedTransformerConfig",
            n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads,
            n_kv_heads=self.n_key_value_heads or self.n_heads, d_head=self.d_head,
            d_mlp=0 if self.attn_only else int(self.d_mlp or 0), d_vocab=self.d_vocab, n_ctx=self.n_ctx, norm=norm,
            act_fn=_ACT.get(self.act_fn or "relu", "relu"),  # type: ignore[arg-type]
            positions=positions, attn_scale=1.0 / self.attn_scale if self.use_attn_scale else 1.0,
            attn_scale_by_inverse_layer=self.scale_attn_by_inverse_layer_idx,
            causal=self.attention_dir == "causal", gated_mlp=self.gated_mlp,
            parallel_attn_mlp=self.parallel_attn_mlp, attn_only=self.attn_only,
            embed_norm=norm if self.post_embedding_ln else None, attn_windows=windows,
            attn_scores_soft_cap=self.attn_scores_soft_cap if self.attn_scores_soft_cap > 0 else None,
            output_logits_soft_cap=self.output_logits_soft_cap if self.output_logits_soft_cap > 0 else None,
            clip_qkv=self.clip_qkv,
        )
