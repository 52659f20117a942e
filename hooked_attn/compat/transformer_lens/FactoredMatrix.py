"""``transformer_lens.FactoredMatrix``: hooked_attn's FactoredMatrix."""

from hooked_attn.factored_matrix import FactoredMatrix

__all__ = ["FactoredMatrix"]
