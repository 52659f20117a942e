"""``transformer_lens.config.HookedTransformerConfig``."""

from hooked_attn.compat.transformer_lens.HookedTransformerConfig import HookedTransformerConfig

__all__ = ["HookedTransformerConfig"]
