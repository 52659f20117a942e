"""``transformer_lens.utilities.logits_utils``: sampling from logits and a table of the top tokens."""

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor


def _apply_repetition_penalty(logits: Float[Tensor, "batch d_vocab"], tokens: Int[Tensor, "batch pos"],
                              penalty: float) -> Tensor:
    """Tokens already in ``tokens`` get their logit divided by ``penalty`` if positive, multiplied if negative."""
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, tokens.to(logits.device), True)
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_logits(final_logits: Float[Tensor, "batch d_vocab"], top_k: int | None = None,
                  top_p: float | None = None, temperature: float = 1.0, freq_penalty: float = 0.0,
                  repetition_penalty: float = 1.0, tokens: Int[Tensor, "batch pos"] | None = None) -> Tensor:
    """One token per row. ``temperature=0`` is greedy; otherwise sample after the penalties, temperature,
    top-k and top-p (nucleus) filtering."""
    if top_k is not None and top_k <= 0:
        raise AssertionError(f"top_k must be positive, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise AssertionError(f"top_p must be in (0, 1], got {top_p}")
    if (freq_penalty or repetition_penalty != 1.0) and tokens is None:
        raise AssertionError("freq_penalty and repetition_penalty need the tokens generated so far (tokens=)")
    logits = final_logits.float()
    if repetition_penalty != 1.0:
        logits = _apply_repetition_penalty(logits, tokens, repetition_penalty)  # type: ignore[arg-type]
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits / temperature
    if freq_penalty:
        counts = torch.zeros_like(logits).scatter_add(-1, tokens.to(logits.device),  # type: ignore[union-attr]
                                                      torch.ones_like(tokens, dtype=logits.dtype))  # type: ignore[arg-type]
        logits = logits - freq_penalty * counts
    from hooked_attn.generation import sample_next

    k = None if top_k is None else min(top_k, logits.shape[-1])
    return sample_next(logits, do_sample=True, temperature=1.0, top_k=k, top_p=top_p)


def logits_to_df(logits: Float[Tensor, " d_vocab"], tokenizer: Any = None, top_k: int | None = None) -> Any:
    """A pandas table of tokens by descending probability: index, (string,) logit, log-prob, probability."""
    import pandas as pd
    from jaxtyping import TypeCheckError

    if logits.ndim != 1:  # the annotation's shape, checked as a runtime type checker would
        raise TypeCheckError(f"logits_to_df: logits must be [d_vocab] (one position), got shape {tuple(logits.shape)}")
    order = logits.argsort(descending=True)[:top_k]
    log_probs = logits.float().log_softmax(-1)
    table: dict[str, Any] = {"token_index": order.tolist()}
    if tokenizer is not None:
        table["token_string"] = [tokenizer.decode([int(i)]) for i in order]
    table |= {"logit": logits[order].tolist(), "log_prob": log_probs[order].tolist(),
              "probability": log_probs[order].exp().tolist()}
    return pd.DataFrame(table)


__all__ = ["logits_to_df", "sample_logits"]
