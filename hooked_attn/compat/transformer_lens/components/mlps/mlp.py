"""``transformer_lens.components.mlps.mlp``: the MLP built from a TransformerLens config."""

from hooked_attn.compat.transformer_lens.components import MLP

__all__ = ["MLP"]
