"""``transformer_lens.config.hooked_transformer_config``."""

from hooked_attn.compat.transformer_lens.HookedTransformerConfig import HookedTransformerConfig

__all__ = ["HookedTransformerConfig"]
