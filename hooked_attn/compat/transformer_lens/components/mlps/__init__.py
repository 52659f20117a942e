"""``transformer_lens.components.mlps``."""
