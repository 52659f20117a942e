"""Parameters whose public shape is the per-head interpretability layout and whose storage is the fused one.

``W_Q`` reads as ``[head d_model d_head]`` but is stored as ``[head d_head d_model]`` (the layout of an
``nn.Linear`` weight), so the forward pass runs one ``F.linear`` over a free view: no copy per call.
"""

import torch
from torch import nn


def strided_parameter(storage_shape: tuple[int, ...], dims: tuple[int, ...]) -> nn.Parameter:
    """A parameter allocated as ``storage_shape`` and exposed as ``storage.permute(dims)``."""
    return nn.Parameter(torch.empty(storage_shape).permute(dims))
