"""Token and learned position embeddings. Mirrors ``wte``/``wpe`` (GPT-2) and ``embed_tokens`` (LLaMA)."""

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from hooked_attn.config import ModelConfig


class Embed(nn.Module):
    """``W_E [d_vocab d_model]``: one row per token id."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.d_vocab = cfg.d_vocab
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        # The range check reads values back to Python, which torch.compile cannot trace; compiled, an
        # out-of-range id still fails (F.embedding raises its own IndexError), only with a terser message.
        if tokens.numel() and not torch.compiler.is_compiling():
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.d_vocab:
                bad = low if low < 0 else high
                raise ValueError(f"token id {bad} is out of range: the vocabulary has ids 0..{self.d_vocab - 1}")
        return torch.nn.functional.embedding(tokens, self.W_E)


class PosEmbed(nn.Module):
    """``W_pos [n_ctx d_model]``: one row per absolute position."""

    def __init__(self, cfg: ModelConfig, n_ctx: int) -> None:
        super().__init__()
        self.n_ctx = n_ctx
        self.W_pos = nn.Parameter(torch.empty(n_ctx, cfg.d_model))

    def forward(self, positions: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        if positions.numel() and not torch.compiler.is_compiling() and int(positions.max()) >= self.n_ctx:
            raise ValueError(
                f"position {int(positions.max())} is past the model's n_ctx={self.n_ctx} learned positions; "
                f"use at most {self.n_ctx} tokens"
            )
        return torch.nn.functional.embedding(positions, self.W_pos)
