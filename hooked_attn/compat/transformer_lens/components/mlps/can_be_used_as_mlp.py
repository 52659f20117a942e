"""``transformer_lens.components.mlps.can_be_used_as_mlp``: the base of TransformerLens' stand-alone MLPs.

These TransformerLens-shaped MLP modules (``MLP``, ``GatedMLP`` in ``transformer_lens.components``)
are for code that builds an MLP on its own from a TransformerLens config: they take every
activation TransformerLens names (``solu_ln`` included: SoLU, ``hook_mid``, then a norm over the
``d_mlp`` axis) and compute TransformerLens' equations. hooked_attn's own models use
``hooked_attn.components.mlp.MLP`` and build only what ``HookedTransformerConfig.to_model_config()``
accepts.
"""

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from hooked_attn.compat.transformer_lens.HookedTransformerConfig import HookedTransformerConfig
from hooked_attn.compat.transformer_lens.utilities import gelu_fast, gelu_new, solu
from hooked_attn.hook_points import HookPoint


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATION_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "gelu_new": gelu_new, "gelu_fast": gelu_fast,
    "gelu_pytorch_tanh": _gelu_tanh, "solu": solu, "solu_ln": solu,
}


class CanBeUsedAsMLP(nn.Module):
    """Holds the config, ``d_mlp`` and the activation; subclasses add the weights and ``forward``."""

    def __init__(self, cfg: HookedTransformerConfig | dict[str, Any]) -> None:
        super().__init__()
        self.cfg = HookedTransformerConfig.unwrap(cfg)
        if self.cfg.d_mlp is None:
            raise ValueError("d_mlp must be set to use an MLP")
        self.d_mlp: int = self.cfg.d_mlp
        self.act_fn: Callable[[Tensor], Tensor] | None = None

    def select_activation_function(self) -> None:
        """Set ``act_fn`` from ``cfg.act_fn``; ``solu_ln`` also adds ``hook_mid`` and ``ln`` (over d_mlp)."""
        from hooked_attn.compat.transformer_lens.components import LayerNorm, LayerNormPre

        name = self.cfg.act_fn
        if name not in ACTIVATION_FUNCTIONS:
            raise ValueError(f"act_fn={name!r} is not one of {sorted(ACTIVATION_FUNCTIONS)}")
        self.act_fn = ACTIVATION_FUNCTIONS[name]
        if name == "solu_ln":
            self.hook_mid = HookPoint()
            if self.cfg.normalization_type == "LN":
                self.ln: nn.Module = LayerNorm(self.cfg, self.d_mlp)
            elif self.cfg.normalization_type == "LNPre":
                self.ln = LayerNormPre(self.cfg)
            else:
                raise ValueError(f"act_fn='solu_ln' needs normalization_type 'LN' or 'LNPre', "
                                 f"got {self.cfg.normalization_type!r}")

    def apply_activation(self, pre: Tensor) -> Tensor:
        """``act_fn(pre)``; for ``solu_ln``, ``ln(hook_mid(solu(pre)))``."""
        assert self.act_fn is not None, "call select_activation_function() first"
        if self.cfg.act_fn == "solu_ln":
            return self.ln(self.hook_mid(self.act_fn(pre)))
        return self.act_fn(pre)


__all__ = ["ACTIVATION_FUNCTIONS", "CanBeUsedAsMLP"]
