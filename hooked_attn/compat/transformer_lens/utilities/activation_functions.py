"""``transformer_lens.utilities.activation_functions``: activations by name and the soft cap."""

import torch
from torch import Tensor

from hooked_attn.compat.transformer_lens.utilities import gelu_fast, gelu_new, solu

SOFTCAP_DISABLED = -1.0  # TransformerLens' config value for "no soft cap"


def softcap_enabled(cap: float | None) -> bool:
    """Whether ``cap`` asks for a soft cap: a positive number (None, 0 and negatives do not)."""
    return cap is not None and cap > 0


def apply_softcap(x: Tensor, cap: float | None) -> Tensor:
    """``cap * tanh(x / cap)`` when the cap is enabled, else ``x`` unchanged."""
    return cap * torch.tanh(x / cap) if softcap_enabled(cap) else x  # type: ignore[operator]


__all__ = ["SOFTCAP_DISABLED", "apply_softcap", "gelu_fast", "gelu_new", "softcap_enabled", "solu"]
