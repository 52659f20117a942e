"""``transformer_lens.components``: hooked_attn's components, built from a TransformerLens config where TL builds them so."""

import dataclasses
from typing import Any

import torch

from hooked_attn.compat.transformer_lens.HookedTransformerConfig import HookedTransformerConfig
from hooked_attn.components.block import TransformerBlock as _Block
from hooked_attn.components.embed import Embed as _Embed, PosEmbed as _PosEmbed
from hooked_attn.components.norms import Norm
from hooked_attn.components.unembed import Unembed as _Unembed
from hooked_attn.config import ModelConfig, NormConfig


def _model_cfg(cfg: Any) -> ModelConfig:
    if isinstance(cfg, ModelConfig):
        return cfg
    return HookedTransformerConfig.unwrap(cfg).to_model_config()


class _TLNorm(Norm):
    """A hooked_attn Norm built from a TransformerLens config (weights 1, biases 0, as TL initialises)."""

    _tl_kind = "layernorm"
    _tl_weight = True

    def __init__(self, cfg: Any, length: int | None = None) -> None:
        tl = cfg if isinstance(cfg, ModelConfig) else HookedTransformerConfig.unwrap(cfg)
        eps = tl.norm.eps if isinstance(tl, ModelConfig) else tl.eps
        weight = self._tl_weight
        super().__init__(NormConfig(kind=self._tl_kind, eps=eps, weight=weight,  # type: ignore[arg-type]
                                    bias=weight and self._tl_kind == "layernorm"), length or tl.d_model)
        with torch.no_grad():
            if self.w is not None:
                self.w.fill_(1.0)
            if self.b is not None:
                self.b.zero_()


class LayerNorm(_TLNorm):
    _tl_kind, _tl_weight = "layernorm", True


class LayerNormPre(_TLNorm):
    _tl_kind, _tl_weight = "layernorm", False

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)


class RMSNorm(_TLNorm):
    _tl_kind, _tl_weight = "rmsnorm", True


class RMSNormPre(_TLNorm):
    _tl_kind, _tl_weight = "rmsnorm", False

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)


class Embed(_Embed):
    def __init__(self, cfg: Any) -> None:
        super().__init__(_model_cfg(cfg))


class PosEmbed(_PosEmbed):
    def __init__(self, cfg: Any) -> None:
        mc = _model_cfg(cfg)
        super().__init__(mc, mc.n_ctx)


class Unembed(_Unembed):
    """``W_U [d_model d_vocab_out]``: a TransformerLens config's ``d_vocab_out`` sets the output width."""

    def __init__(self, cfg: Any) -> None:
        mc = _model_cfg(cfg)
        out = getattr(HookedTransformerConfig.unwrap(cfg), "d_vocab_out", -1) if not isinstance(cfg, ModelConfig) else -1
        super().__init__(dataclasses.replace(mc, d_vocab=out) if out > 0 and out != mc.d_vocab else mc)


class TransformerBlock(_Block):
    def __init__(self, cfg: Any, block_index: int) -> None:
        super().__init__(_model_cfg(cfg), block_index)


from hooked_attn.compat.transformer_lens.components.abstract_attention import AbstractAttention  # noqa: E402
from hooked_attn.compat.transformer_lens.components.attention import Attention  # noqa: E402
from hooked_attn.compat.transformer_lens.components.grouped_query_attention import GroupedQueryAttention  # noqa: E402
from hooked_attn.compat.transformer_lens.components.mlps.gated_mlp import GatedMLP  # noqa: E402
from hooked_attn.compat.transformer_lens.components.mlps.mlp import MLP  # noqa: E402
from hooked_attn.compat.transformer_lens.components.mlps.moe import MoE  # noqa: E402

__all__ = ["AbstractAttention", "Attention", "Embed", "GatedMLP", "GroupedQueryAttention", "LayerNorm", "LayerNormPre", "MLP", "MoE", "PosEmbed", "RMSNorm",
           "RMSNormPre", "TransformerBlock", "Unembed"]
