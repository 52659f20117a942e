"""``transformer_lens.evals``: the evaluations hooked_attn provides under TransformerLens' names."""

import torch
from torch import Tensor

from hooked_attn.analysis.heads import repeated_random_tokens


@torch.no_grad()
def induction_loss(model, tokenizer=None, batch_size: int = 4, subseq_len: int = 384, prepend_bos: bool | None = None,
                   device=None) -> Tensor:  # type: ignore[no-untyped-def]
    """Mean next-token loss on the second half of random token sequences repeated twice."""
    tokens = repeated_random_tokens(model.cfg.d_vocab, subseq_len, batch=batch_size)
    loss = model(tokens.to(model.device), return_type="loss", loss_per_token=True)
    return loss[:, -subseq_len + 1:].mean()


__all__ = ["induction_loss"]
