"""``transformer_lens.utilities.cache``: helpers for key/value caches."""

from hooked_attn.components.kv_cache import KVCache


def get_pos_offset(past_kv_cache: KVCache | None, batch_size: int) -> int:
    """How many positions the cache already holds (0 without a cache); ``batch_size`` is not used."""
    if past_kv_cache is None:
        return 0
    return int(past_kv_cache.layers[0].n_positions)


__all__ = ["get_pos_offset"]
