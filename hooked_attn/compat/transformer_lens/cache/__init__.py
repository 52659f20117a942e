"""``transformer_lens.cache``: TransformerLens' key/value cache classes, as subclasses of hooked_attn's KVCache."""

from hooked_attn.compat.transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from hooked_attn.compat.transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

__all__ = ["TransformerLensKeyValueCache", "TransformerLensKeyValueCacheEntry"]
