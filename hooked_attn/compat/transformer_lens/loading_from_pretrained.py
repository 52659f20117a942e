"""``transformer_lens.loading_from_pretrained``: loading goes through hooked_attn's loader."""

from hooked_attn.loading import from_pretrained

__all__ = ["from_pretrained"]
