"""The key/value cache: each layer's keys (after rotary) and values for the positions already run."""

import contextlib
from collections.abc import Iterator
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

    @property
    def n_positions(self) -> int:
        return 0 if self.k is None else self.k.shape[1]


@dataclass
class KVCache:
    """Keys and values of every layer, plus the attention mask of the cached positions.

    Pass the same object to successive forwards (``model(new_tokens, past_kv_cache=cache)``): each
    call runs only the new positions and appends them. ``attention_mask`` is None while every
    cached position is a real token. A forward that fails (bad input, a hook that raises) leaves the
    cache exactly as it was: each call is one ``step()``.
    """

    layers: list[LayerKV]
    attention_mask: Int[Tensor, "batch pos"] | None = None
    n_cached: int = field(default=0)

    @classmethod
    def empty(cls, n_layers: int) -> "KVCache":
        return cls(layers=[LayerKV() for _ in range(n_layers)])

    def check_fits(self, n_layers: int, input_shape: tuple[int, ...], kv_shape: tuple[int, int] | None = None) -> None:
        """Refuse a cache made for another model (layer count, ``kv_shape`` = (kv_head, d_head)), another
        batch, or left inconsistent by hand."""
        if len(self.layers) != n_layers:
            raise ValueError(f"past_kv_cache has {len(self.layers)} layers, but the model has {n_layers}: "
                             f"make it with KVCache.empty({n_layers})")
        counts = {layer.n_positions for layer in self.layers}
        if counts != {self.n_cached}:
            raise ValueError(f"past_kv_cache is inconsistent: n_cached={self.n_cached}, but its layers hold "
                             f"{sorted(counts)} positions; start a new one with KVCache.empty({n_layers})")
        if self.attention_mask is not None and self.attention_mask.shape[1] != self.n_cached:
            raise ValueError(f"past_kv_cache is inconsistent: its attention_mask covers "
                             f"{self.attention_mask.shape[1]} positions, n_cached={self.n_cached}")
        k = self.layers[0].k if self.layers else None
        if kv_shape is not None and k is not None and tuple(k.shape[2:]) != tuple(kv_shape):
            raise ValueError(f"past_kv_cache holds keys of {tuple(k.shape[2:])} [kv_head d_head], but this model's "
                             f"are {tuple(kv_shape)}: the cache was made by another model")
        if self.n_cached:
            cached = self.attention_mask if self.attention_mask is not None else self.layers[0].k
            assert cached is not None
            if cached.shape[0] != input_shape[0]:
                raise ValueError(f"past_kv_cache holds a batch of {cached.shape[0]} sequences "
                                 f"({self.n_cached} positions each), but the input is {tuple(input_shape)} [batch pos]")

    def mask_with(self, new_mask: Tensor | None, n_new: int, batch: int, device: torch.device) -> Tensor | None:
        """The mask over cached + new positions (None while every position is real); changes nothing."""
        if new_mask is None and self.attention_mask is None:
            return None
        old = self.attention_mask
        if old is None:
            old = torch.ones(batch, self.n_cached, dtype=torch.long, device=device)
        new = torch.ones(batch, n_new, dtype=torch.long, device=device) if new_mask is None else new_mask.long()
        return torch.cat([old.to(device), new.to(device)], dim=1)

    @contextlib.contextmanager
    def step(self, full_mask: Tensor | None, n_new: int, commit: bool = True) -> Iterator["KVCache"]:
        """One forward's worth of appends: committed (mask and count) when the body returns, rolled back
        to the state before on any exception, and checked: every layer must have appended ``n_new``.
        With ``commit=False`` (a forward that stops early) the cache is read and always left as it was."""
        saved = [(layer.k, layer.v) for layer in self.layers]
        try:
            yield self
            appended = {layer.n_positions for layer in self.layers}
            if commit and appended != {self.n_cached + n_new}:
                raise RuntimeError(f"a KV-cache step appended {sorted(appended)} positions across layers, "
                                   f"expected {self.n_cached + n_new} in every layer")
        except BaseException:
            commit = False
            raise
        finally:
            if not commit:
                for layer, (k, v) in zip(self.layers, saved):
                    layer.k, layer.v = k, v
        if commit:
            self.attention_mask = full_mask
            self.n_cached += n_new
