"""``transformer_lens.HookedEncoder``: hooked_attn's HookedEncoder (BERT-style encoders)."""

from hooked_attn.encoder import HookedEncoder

__all__ = ["HookedEncoder"]
