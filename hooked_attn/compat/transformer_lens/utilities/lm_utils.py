"""``transformer_lens.utilities.lm_utils``: next-token loss and accuracy."""

from jaxtyping import Float, Int
from torch import Tensor

from hooked_attn.compat.errors import CompatError


def lm_cross_entropy_loss(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"],
                          attention_mask: Int[Tensor, "batch pos"] | None = None, per_token: bool = False) -> Tensor:
    """Next-token cross-entropy; padded transitions (mask 0 at either end) are left out (and are 0 per token)."""
    if attention_mask is not None and attention_mask.shape != tokens.shape:
        raise CompatError(f"attention_mask has shape {tuple(attention_mask.shape)}, tokens {tuple(tokens.shape)}")
    log_probs = logits[:, :-1].float().log_softmax(-1)
    loss = -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]
    if attention_mask is None:
        return loss if per_token else loss.mean()
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    loss = loss.masked_fill(~valid, 0.0)
    return loss if per_token else loss.sum() / valid.sum()


def lm_accuracy(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"],
                per_token: bool = False) -> Tensor:
    """Whether each position's argmax is the next token (``[batch pos-1]`` bools), or the mean."""
    correct = logits[:, :-1].argmax(-1) == tokens[:, 1:]
    return correct if per_token else correct.float().mean()


__all__ = ["lm_accuracy", "lm_cross_entropy_loss"]
