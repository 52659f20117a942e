"""Helpers for checking wrap() against SDPA: a counter of the calls a model makes, and the pattern a
hand computation gives from hooked q and k (shared by tests/test_wrap_models.py and scripts/vision_wrap)."""

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class CountSdpa(TorchFunctionMode):
    """Counts F.scaled_dot_product_attention calls made while active, independently of the wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += func is F.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


def hand_pattern(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_head)) from hooked [batch pos head d_head] tensors, kv heads repeated."""
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    return (torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])).softmax(-1)
