"""``transformer_lens.head_detector``: score heads against a detection pattern, under TransformerLens' names."""

from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_attn.analysis.heads import attention_patterns

HEAD_NAMES = ["previous_token_head", "duplicate_token_head", "induction_head"]
ErrorMeasure = Literal["abs", "mul"]


def get_previous_token_head_detection_pattern(tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "pos pos"]:
    """1 on the diagonal just below the main one (each token attends to its predecessor)."""
    n = tokens.shape[-1]
    return torch.ones(n - 1).diag(-1) if n > 1 else torch.zeros(1, 1)


def get_duplicate_token_head_detection_pattern(tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "pos pos"]:
    """1 where an earlier position holds the same token."""
    ids = tokens[0] if tokens.ndim == 2 else tokens
    return ((ids[:, None] == ids[None, :]).float().tril(-1))


def get_induction_head_detection_pattern(tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "pos pos"]:
    """1 on the token after an earlier copy of the current token."""
    dup = get_duplicate_token_head_detection_pattern(tokens)
    return torch.cat([torch.zeros(dup.shape[0], 1), dup[:, :-1]], dim=1)


def detect_head(model, seq: str | list[str] | Tensor, detection_pattern: Tensor | str,  # type: ignore[no-untyped-def]
                heads: list[tuple[int, int]] | dict[int, list[int]] | None = None, cache=None,
                exclude_bos: bool = False, exclude_current_token: bool = False,
                error_measure: ErrorMeasure = "mul") -> Float[Tensor, "layer head"]:
    """Each head's agreement with ``detection_pattern`` ``[pos pos]`` on ``seq``, ``[layer head]``.

    ``"mul"``: the share of attention that falls on the pattern; ``"abs"``: one minus the mean
    absolute difference, rounded to 3 decimals. Heads not in ``heads`` get -1.
    """
    seqs = [seq] if isinstance(seq, (str, Tensor)) else seq
    results = []
    for s in seqs:
        tokens = model.to_tokens(s).cpu() if isinstance(s, str) else (s if s.ndim == 2 else s[None]).cpu()
        pattern = detection_pattern
        if isinstance(pattern, str):
            pattern = {"previous_token_head": get_previous_token_head_detection_pattern,
                       "duplicate_token_head": get_duplicate_token_head_detection_pattern,
                       "induction_head": get_induction_head_detection_pattern}[pattern](tokens)
        attn = attention_patterns(model, tokens)[:, 0]  # [layer head q_pos k_pos]
        if exclude_bos:
            attn = attn.clone()
            attn[..., 0] = 0
        if exclude_current_token:
            attn = attn * (1 - torch.eye(attn.shape[-1]))
        if error_measure == "mul":
            score = (attn * pattern).sum((-1, -2)) / attn.sum((-1, -2))
        elif error_measure == "abs":
            score = (1 - (attn - pattern).abs().sum((-1, -2)) / attn.shape[-1]).round(decimals=3)
        else:
            raise ValueError(f"error_measure must be 'mul' or 'abs', got {error_measure!r}")
        results.append(score)
    scores = torch.stack(results).mean(0)
    if heads is not None:
        keep = torch.zeros_like(scores, dtype=torch.bool)
        pairs = heads.items() if isinstance(heads, dict) else ((layer, [head]) for layer, head in heads)
        for layer, hs in pairs:
            keep[layer, hs] = True
        scores = torch.where(keep, scores, torch.full_like(scores, -1.0))
    return scores


__all__ = ["HEAD_NAMES", "ErrorMeasure", "detect_head", "get_duplicate_token_head_detection_pattern",
           "get_induction_head_detection_pattern", "get_previous_token_head_detection_pattern"]
