"""``transformer_lens.cache.key_value_cache``: every layer's cache entry plus the cached attention mask.

``TransformerLensKeyValueCache`` is a hooked_attn ``KVCache``, so ``model(tokens, past_kv_cache=cache)``
takes it as it is. TransformerLens' surface: ``entries``, ``previous_attention_mask`` (``[batch pos]``,
1 for real tokens), ``init_cache(cfg, device, batch_size)``, ``freeze()`` / ``unfreeze()`` (a frozen
cache is read by a forward but not extended), ``append_attention_mask`` and ``cache[layer]``.
"""

from collections.abc import Iterator
import contextlib
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from hooked_attn.compat.transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from hooked_attn.components.kv_cache import KVCache


class TransformerLensKeyValueCache(KVCache):
    def __init__(self, entries: list[TransformerLensKeyValueCacheEntry],
                 previous_attention_mask: Int[Tensor, "batch pos"], frozen: bool = False) -> None:
        if not entries:
            raise ValueError("a TransformerLensKeyValueCache needs one entry per layer, got none")
        n_cached = entries[0].n_positions
        if any(entry.n_positions != n_cached for entry in entries):
            raise ValueError(f"cache entries hold {sorted({e.n_positions for e in entries})} positions: "
                             "every layer must hold the same number")
        super().__init__(layers=list(entries), attention_mask=previous_attention_mask, n_cached=n_cached)
        self.frozen = frozen
        for entry in entries:
            entry.frozen = frozen

    @classmethod
    def init_cache(cls, cfg: Any, device: torch.device | str | None = None,
                   batch_size: int = 1) -> "TransformerLensKeyValueCache":
        """An empty cache for ``cfg.n_layers`` layers of ``batch_size`` sequences."""
        device = device if device is not None else getattr(cfg, "device", None)
        entries = [TransformerLensKeyValueCacheEntry.init_cache_entry(cfg, device, batch_size)
                   for _ in range(cfg.n_layers)]
        return cls(entries, torch.empty((batch_size, 0), dtype=torch.int, device=device))

    @property
    def entries(self) -> list[TransformerLensKeyValueCacheEntry]:
        return self.layers  # type: ignore[return-value]

    @property
    def previous_attention_mask(self) -> Tensor:
        """The mask of the cached positions (all ones while hooked_attn keeps none)."""
        if self.attention_mask is not None:
            return self.attention_mask
        batch = self.entries[0].past_keys.shape[0]
        return torch.ones((batch, self.n_cached), dtype=torch.int, device=self.entries[0].past_keys.device)

    @previous_attention_mask.setter
    def previous_attention_mask(self, value: Tensor) -> None:
        self.attention_mask = value

    def freeze(self) -> None:
        self.frozen = True
        for entry in self.entries:
            entry.frozen = True

    def unfreeze(self) -> None:
        self.frozen = False
        for entry in self.entries:
            entry.frozen = False

    def append_attention_mask(self, attention_mask: Int[Tensor, "batch new_pos"]) -> Tensor:
        """The cached mask followed by ``attention_mask``; stored unless the cache is frozen."""
        previous = self.previous_attention_mask
        updated = torch.cat([previous, attention_mask.to(previous.device, previous.dtype)], dim=-1)
        if not self.frozen:
            self.attention_mask = updated
        return updated

    @contextlib.contextmanager
    def step(self, full_mask: Tensor | None, n_new: int, commit: bool = True) -> Iterator[KVCache]:
        """As ``KVCache.step``; a frozen cache is read but never extended (nothing is committed)."""
        with super().step(full_mask, n_new, commit=commit and not self.frozen) as cache:
            yield cache

    def __getitem__(self, idx: int) -> TransformerLensKeyValueCacheEntry:
        return self.entries[idx]

    def __len__(self) -> int:
        return len(self.entries)


__all__ = ["TransformerLensKeyValueCache"]
