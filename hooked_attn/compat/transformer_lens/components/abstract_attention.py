"""``transformer_lens.components.abstract_attention``: the attention base class (see ``components``)."""

from hooked_attn.compat.transformer_lens.components import AbstractAttention

__all__ = ["AbstractAttention"]
