"""MLP activation functions by their HF names."""

from collections.abc import Callable
from functools import partial

import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": partial(F.gelu, approximate="tanh"),  # HF NewGELUActivation: the tanh approximation
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}
