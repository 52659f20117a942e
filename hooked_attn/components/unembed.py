"""The unembedding: residual stream to logits. Mirrors HF ``lm_head``."""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_attn.components.params import strided_parameter
from hooked_attn.config import ModelConfig


class Unembed(nn.Module):
    """``W_U [d_model d_vocab]`` and ``b_U [d_vocab]`` (zeros where the family has no bias)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_U = strided_parameter((cfg.d_vocab, cfg.d_model), (1, 0))
        self.b_U = nn.Parameter(torch.empty(cfg.d_vocab))

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_vocab"]:
        return F.linear(x, self.W_U.T, self.b_U)
