"""``transformer_lens.components``: hooked_attn's components, built from a TransformerLens config where TL builds them so."""

from typing import Any

import torch

from hooked_attn.compat.transformer_lens.HookedTransformerConfig import HookedTransformerConfig
from hooked_attn.components.attention import Attention as _Attention
from hooked_attn.components.block import TransformerBlock as _Block
from hooked_attn.components.embed import Embed as _Embed, PosEmbed as _PosEmbed
from hooked_attn.components.mlp import MLP as _MLP
from hooked_attn.components.norms import Norm
from hooked_attn.components.unembed import Unembed as _Unembed
from hooked_attn.config import ModelConfig, NormConfig


def _model_cfg(cfg: Any) -> ModelConfig:
    if isinstance(cfg, ModelConfig):
        return cfg
    return HookedTransformerConfig.unwrap(cfg).to_model_config()


def _norm(kind: str, weight: bool, cfg: Any, length: int | None) -> Norm:
    tl = cfg if isinstance(cfg, ModelConfig) else HookedTransformerConfig.unwrap(cfg)
    eps = tl.norm.eps if isinstance(tl, ModelConfig) else tl.eps
    norm = Norm(NormConfig(kind=kind, eps=eps, weight=weight, bias=weight and kind == "layernorm"),  # type: ignore[arg-type]
                length or tl.d_model)
    with torch.no_grad():
        if norm.w is not None:
            norm.w.fill_(1.0)
        if norm.b is not None:
            norm.b.zero_()
    return norm


def LayerNorm(cfg: Any, length: int | None = None) -> Norm:  # noqa: N802  (TransformerLens' class name)
    return _norm("layernorm", True, cfg, length)


def LayerNormPre(cfg: Any) -> Norm:  # noqa: N802
    return _norm("layernorm", False, cfg, None)


def RMSNorm(cfg: Any, length: int | None = None) -> Norm:  # noqa: N802
    return _norm("rmsnorm", True, cfg, length)


def RMSNormPre(cfg: Any) -> Norm:  # noqa: N802
    return _norm("rmsnorm", False, cfg, None)


class Embed(_Embed):
    def __init__(self, cfg: Any) -> None:
        super().__init__(_model_cfg(cfg))


class PosEmbed(_PosEmbed):
    def __init__(self, cfg: Any) -> None:
        mc = _model_cfg(cfg)
        super().__init__(mc, mc.n_ctx)


class Unembed(_Unembed):
    def __init__(self, cfg: Any) -> None:
        super().__init__(_model_cfg(cfg))


class MLP(_MLP):
    def __init__(self, cfg: Any) -> None:
        super().__init__(_model_cfg(cfg))


class GatedMLP(_MLP):
    def __init__(self, cfg: Any) -> None:
        mc = _model_cfg(cfg)
        super().__init__(mc.replace(gated_mlp=True))


class Attention(_Attention):
    def __init__(self, cfg: Any, attn_type: str = "global", layer_id: int | None = None) -> None:
        super().__init__(_model_cfg(cfg), layer_id or 0)


class TransformerBlock(_Block):
    def __init__(self, cfg: Any, block_index: int) -> None:
        super().__init__(_model_cfg(cfg), block_index)


__all__ = ["Attention", "Embed", "GatedMLP", "LayerNorm", "LayerNormPre", "MLP", "PosEmbed", "RMSNorm",
           "RMSNormPre", "TransformerBlock", "Unembed"]
