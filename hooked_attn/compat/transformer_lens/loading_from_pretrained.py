"""``transformer_lens.loading_from_pretrained``: loading goes through hooked_attn's loader."""

from typing import Any


def from_pretrained(model_name_or_path: Any, **kwargs: Any) -> Any:
    """Load a model (see ``hooked_attn.HookedTransformer.from_pretrained``)."""
    from hooked_attn.compat.transformer_lens.HookedTransformer import HookedTransformer

    return HookedTransformer.from_pretrained(model_name_or_path, **kwargs)


__all__ = ["from_pretrained"]
