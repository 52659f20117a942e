"""``transformer_lens.config``: the model config."""

from hooked_attn.compat.transformer_lens.HookedTransformerConfig import HookedTransformerConfig

__all__ = ["HookedTransformerConfig"]
