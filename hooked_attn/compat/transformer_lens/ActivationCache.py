"""``transformer_lens.ActivationCache``: hooked_attn's ActivationCache."""

from hooked_attn.cache import ActivationCache

__all__ = ["ActivationCache"]
