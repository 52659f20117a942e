"""``transformer_lens.utilities.tensors``: small tensor helpers."""

from typing import Any

import numpy as np
import torch
from torch import Tensor


def to_numpy(tensor: Any) -> np.ndarray:
    """A numpy array of a tensor (bfloat16 upcast to float32, which numpy has), array, list, tuple or scalar."""
    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, (list, tuple)):
        return np.array(tensor)
    if isinstance(tensor, Tensor):
        t = tensor.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    if isinstance(tensor, (int, float, bool, str)):
        return np.array(tensor)
    raise ValueError(f"to_numpy got an invalid type: {type(tensor).__name__}")


def filter_dict_by_prefix(dictionary: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The entries whose key starts with ``prefix`` (a trailing dot optional), keyed by the rest."""
    prefix = prefix if prefix.endswith(".") else prefix + "."
    return {key[len(prefix):]: value for key, value in dictionary.items() if key.startswith(prefix)}


__all__ = ["filter_dict_by_prefix", "to_numpy"]
