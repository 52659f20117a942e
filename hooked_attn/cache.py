"""ActivationCache: the activations of one forward pass, by hook name, with TransformerLens' shorthand."""

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hooked_attn.utils import get_act_name

if TYPE_CHECKING:
    from hooked_attn.hook_points import HookedRootModule


class ActivationCache(Mapping[str, Tensor]):
    """A read-only mapping of hook name to tensor.

    ``cache["blocks.3.attn.hook_pattern"]``, ``cache["pattern", 3]`` and ``cache["scale", 3, "ln1"]``
    name the same kind of entry; a missing name raises a KeyError that lists what was cached.
    """

    def __init__(
        self, cache_dict: dict[str, Tensor], model: "HookedRootModule | None" = None,
        has_batch_dim: bool = True,
    ) -> None:
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    def _key(self, key: str | tuple) -> str:
        if isinstance(key, tuple):
            return get_act_name(*key)
        if key in self.cache_dict:
            return key
        return get_act_name(key)

    def __getitem__(self, key: str | tuple) -> Tensor:  # type: ignore[override]
        name = self._key(key)
        if name not in self.cache_dict:
            cached = ", ".join(list(self.cache_dict)[:8]) + (" ..." if len(self.cache_dict) > 8 else "")
            raise KeyError(f"{name!r} is not in this cache ({len(self.cache_dict)} entries: {cached})")
        return self.cache_dict[name]

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, (str, tuple)):
            return False
        try:
            return self._key(key) in self.cache_dict
        except (ValueError, TypeError):
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations, has_batch_dim={self.has_batch_dim})"

    def to(self, device: torch.device | str, move_model: bool = False) -> "ActivationCache":
        """Move every tensor to ``device`` (and the model too, if asked)."""
        self.cache_dict = {name: t.to(device) for name, t in self.cache_dict.items()}
        if move_model and self.model is not None:
            self.model.to(device)
        return self

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop the batch axis of a batch-of-one cache.

        Raises:
            ValueError: the batch is not of size one, or the batch axis is already gone.
        """
        if not self.has_batch_dim:
            raise ValueError("this cache has no batch dimension left to remove")
        for name, t in self.cache_dict.items():
            if t.shape[0] != 1:
                raise ValueError(f"cannot remove the batch dimension: {name} has batch size {t.shape[0]}, not 1")
        self.cache_dict = {name: t[0] for name, t in self.cache_dict.items()}
        self.has_batch_dim = False
        return self
