"""The key/value cache: each layer's keys (after rotary) and values for the positions already run."""

from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclass
class LayerKV:
    """One layer's cached ``k``/``v`` ``[batch pos kv_head d_head]`` (None before the first forward)."""

    k: Tensor | None = None
    v: Tensor | None = None

    def append(
        self, k: Float[Tensor, "batch pos kv_head d_head"], v: Float[Tensor, "batch pos kv_head d_head"]
    ) -> tuple[Tensor, Tensor]:
        """Add this forward's keys and values; return all of them, cached first."""
        if self.k is not None and self.v is not None:
            k, v = torch.cat([self.k, k], dim=1), torch.cat([self.v, v], dim=1)
        self.k, self.v = k, v
        return k, v


@dataclass
class KVCache:
    """Keys and values of every layer, plus the attention mask of the cached positions.

    Pass the same object to successive forwards (``model(new_tokens, past_kv_cache=cache)``): each
    call runs only the new positions and appends them. ``attention_mask`` is None while every
    cached position is a real token.
    """

    layers: list[LayerKV]
    attention_mask: Int[Tensor, "batch pos"] | None = None
    n_cached: int = field(default=0)

    @classmethod
    def empty(cls, n_layers: int) -> "KVCache":
        return cls(layers=[LayerKV() for _ in range(n_layers)])

    def freeze_mask(self, new_mask: Tensor | None, n_new: int, batch: int, device: torch.device) -> Tensor | None:
        """The mask over cached + new positions, recorded for the next call."""
        if new_mask is None and self.attention_mask is None:
            self.n_cached += n_new
            return None
        old = self.attention_mask
        if old is None:
            old = torch.ones(batch, self.n_cached, dtype=torch.long, device=device)
        new = torch.ones(batch, n_new, dtype=torch.long, device=device) if new_mask is None else new_mask.long()
        self.attention_mask = torch.cat([old.to(device), new.to(device)], dim=1)
        self.n_cached += n_new
        return self.attention_mask
