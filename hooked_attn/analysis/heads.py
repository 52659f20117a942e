"""Head scores over a whole model: previous-token, first-token, duplicate-token, induction, or any pattern.

Every score here is one measure, ``pattern_scores``: for each query row that a *target* marks at
least one key in, the attention weight the head puts on the marked keys (weighted by the target),
averaged over those rows and the batch. A head whose pattern is exactly the target scores 1; a
head that never attends where the target points scores 0. The built-in targets are made from the
token ids, so they apply to any text; by default the model-level functions run on repeated random
sequences (a random block, then the same block again), where induction and duplicate-token heads
show themselves.
"""

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_attn.hook_points import HookedRootModule
from hooked_attn.analysis.patterns import stack_patterns
from hooked_attn.tokens import PADDING_MASK_ATTR, check_attention_mask

Target = Float[Tensor, "q_pos k_pos"] | Float[Tensor, "batch q_pos k_pos"]
TargetFn = Callable[[Tensor], Tensor]


def _is_pattern(name: str) -> bool:
    return name.endswith("hook_pattern")  # also a wrapped model's (hooked_attn.wrap) attention calls


def _check_tokens(tokens: Tensor) -> None:
    if tokens.ndim != 2 or tokens.dtype.is_floating_point:
        raise ValueError(f"tokens must be integer ids [batch pos], got a {tokens.dtype} tensor of shape "
                         f"{tuple(tokens.shape)}")


# -- targets: where a head of each kind puts its attention --------------------------------------

def previous_token_target(n_pos: int) -> Float[Tensor, "q_pos k_pos"]:
    """1 at (q, q-1) for every query after the first: a previous-token head's pattern."""
    return torch.ones(n_pos - 1).diag(-1) if n_pos > 1 else torch.zeros(1, 1)


def first_token_target(n_pos: int) -> Float[Tensor, "q_pos k_pos"]:
    """1 at (q, 0) for every query after the first (whose only choice is key 0): an attention sink."""
    target = torch.zeros(n_pos, n_pos)
    target[1:, 0] = 1.0
    return target


def duplicate_token_target(tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch q_pos k_pos"]:
    """1 at (q, k) for every earlier key ``k < q`` holding the same token as the query."""
    _check_tokens(tokens)
    same = tokens[:, :, None] == tokens[:, None, :]
    return (same & torch.ones_like(same[0]).tril(-1)).float()


def induction_target(tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch q_pos k_pos"]:
    """1 at (q, k) for every earlier key ``k < q`` whose *previous* token equals the query's token:
    the token that followed an earlier occurrence of the current one, where an induction head looks."""
    _check_tokens(tokens)
    target = torch.zeros(tokens.shape[0], tokens.shape[1], tokens.shape[1])
    follows = tokens[:, :, None] == tokens[:, None, :-1]  # [batch q_pos k_pos-1]: token[q] == token[k-1]
    target[:, :, 1:] = (follows & torch.ones_like(follows[0]).tril(-2)).float()  # k-1 < q-1, so k < q
    return target


# -- the one measure ----------------------------------------------------------------------------

def pattern_scores(
    patterns: Float[Tensor, "*lead head q_pos k_pos"], target: Target,
) -> Float[Tensor, "*layer head"]:
    """How closely each head follows ``target``: the target-weighted attention per row, averaged.

    Args:
        patterns: ``[layer batch head q_pos k_pos]`` (from ``attention_patterns``), one layer's
            ``[batch head q_pos k_pos]``, or an unbatched ``[head q_pos k_pos]``.
        target: ``[q_pos k_pos]`` for every sequence, or ``[batch q_pos k_pos]`` per sequence; weights
            (usually 0 or 1) saying where attention should go. Rows with no weight are skipped.

    Returns:
        ``[layer head]`` for a stack, ``[head]`` for one layer.

    Raises:
        ValueError: the shapes disagree, or the target marks no key at all.
    """
    if patterns.ndim not in (3, 4, 5):
        raise ValueError("patterns must be [layer batch head q_pos k_pos], [batch head q_pos k_pos] or "
                         f"[head q_pos k_pos], got shape {tuple(patterns.shape)}")
    stacked = patterns if patterns.ndim == 5 else patterns[None] if patterns.ndim == 4 else patterns[None, None]
    n_batch, _, q_pos, k_pos = stacked.shape[1:]
    if target.ndim not in (2, 3):
        raise ValueError(f"target must be [q_pos k_pos] or [batch q_pos k_pos], got shape {tuple(target.shape)}")
    batched_target = target[None] if target.ndim == 2 else target
    if tuple(batched_target.shape[1:]) != (q_pos, k_pos) or batched_target.shape[0] not in (1, n_batch):
        raise ValueError(f"target has shape {tuple(target.shape)}, but the patterns are batch={n_batch} "
                         f"q_pos={q_pos} k_pos={k_pos}")
    batched_target = batched_target.to(device=stacked.device, dtype=torch.float32).expand(n_batch, q_pos, k_pos)
    rows = batched_target.sum(-1) != 0  # [batch q_pos]: the rows the target says something about
    if not rows.any():
        raise ValueError("the target marks no key in any row: there is nothing to score")
    on_target = (stacked.float() * batched_target[None, :, None]).sum(-1)  # [layer batch head q_pos]
    scores = (on_target * rows[None, :, None]).sum((1, 3)) / rows.sum()
    return scores if patterns.ndim == 5 else scores[0]


# -- running a model ----------------------------------------------------------------------------

def repeated_random_tokens(
    d_vocab: int, seq_len: int, batch: int = 4, seed: int = 0, bos_token_id: int | None = None,
) -> Int[Tensor, "batch pos"]:
    """``batch`` sequences of ``seq_len`` distinct random tokens, each repeated once: ``[batch pos]``
    with ``pos = 2 * seq_len`` (plus one with ``bos_token_id`` first). Drawing without replacement
    (and never the BOS id) means the only repeats are the second copy, so the duplicate and
    induction targets are exactly the two stripes ``k = q - seq_len`` and ``k = q - seq_len + 1``.

    Raises:
        ValueError: the vocabulary is too small for ``seq_len`` distinct tokens, or a size is below 1.
    """
    if seq_len < 2 or batch < 1:
        raise ValueError(f"need seq_len >= 2 and batch >= 1, got seq_len={seq_len}, batch={batch}")
    allowed = torch.tensor([t for t in range(d_vocab) if t != bos_token_id])
    if len(allowed) < seq_len:
        raise ValueError(f"seq_len={seq_len} distinct tokens need a larger vocabulary than d_vocab={d_vocab}")
    gen = torch.Generator().manual_seed(seed)
    block = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:seq_len]] for _ in range(batch)])
    tokens = torch.cat([block, block], dim=1)
    if bos_token_id is not None:
        tokens = torch.cat([torch.full((batch, 1), bos_token_id), tokens], dim=1)
    return tokens


def attention_patterns(
    model: HookedRootModule, tokens: Int[Tensor, "batch pos"], attention_mask: Tensor | None = None,
) -> Float[Tensor, "layer batch head q_pos k_pos"]:
    """Run ``model`` on ``tokens`` caching only the pattern hooks; every layer's pattern, stacked (on CPU).

    Caching the patterns makes each layer take the explicit attention path, so these are the exact
    softmax weights the model used. ``attention_mask`` (1 = real token) runs a padded batch as each
    row would run alone; ids padded by ``model.to_tokens`` carry theirs.
    """
    _check_tokens(tokens)
    device = next(model.parameters()).device
    mask = {} if attention_mask is None else {"attention_mask": attention_mask.to(device)}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(device), names_filter=_is_pattern, device="cpu", **mask)
    if not any(_is_pattern(name) for name in model.hook_dict):
        raise ValueError(f"{type(model).__name__} has no attention pattern hooks")
    return stack_patterns(cache).float()


def _model_tokens(
    model: HookedRootModule, tokens: Tensor | str | list[str] | None, seq_len: int, batch: int, seed: int,
    bos_token_id: int | None, attention_mask: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """The ids to score (on CPU) and their padding mask (None when every token is real)."""
    if tokens is None or isinstance(tokens, (str, list)):
        if attention_mask is not None:
            raise ValueError("attention_mask goes with token ids; texts are tokenized (and masked) here")
        if tokens is None:
            return repeated_random_tokens(model.cfg.d_vocab, seq_len, batch, seed, bos_token_id), None
        ids, mask = model.tokenize(tokens)  # a list of texts is padded: its mask comes with it
        return ids.cpu(), None if bool(mask.all()) else mask.cpu()
    _check_tokens(tokens)
    mask = getattr(tokens, PADDING_MASK_ATTR, None) if attention_mask is None else attention_mask
    if mask is None:
        return tokens.cpu(), None
    mask = check_attention_mask(mask, tuple(tokens.shape), torch.device("cpu"))
    return tokens.cpu(), None if bool(mask.all()) else mask


def _padded_target(target: Target | TargetFn, ids: Tensor, mask: Tensor | None) -> Tensor:
    """The target for padded ids: a target function sees each row's real tokens only (as if the row
    ran alone) and its weights go back to their padded positions; a given tensor loses every weight
    from or to a padding position. Padding never counts, as a query or as a key."""
    if mask is None:
        return target(ids) if callable(target) else target
    real = mask.bool()
    if not callable(target):
        weights = target if target.ndim == 3 else target[None].expand(ids.shape[0], -1, -1)
        return weights * (real[:, :, None] & real[:, None, :]).to(weights.dtype)
    out = torch.zeros(ids.shape[0], ids.shape[1], ids.shape[1])
    for row in range(ids.shape[0]):
        where = real[row].nonzero().squeeze(-1)
        part = target(ids[row, where][None])
        out[row, where[:, None], where[None, :]] = (part[0] if part.ndim == 3 else part).float()
    return out


def detect_heads(
    model: HookedRootModule, target: Target | TargetFn, tokens: Tensor | str | list[str] | None = None, *,
    seq_len: int = 20, batch: int = 4, seed: int = 0, bos_token_id: int | None = None,
    attention_mask: Tensor | None = None,
) -> Float[Tensor, "layer head"]:
    """Score every head of ``model`` against a target pattern of your own: ``[layer head]``.

    Args:
        model: a ``HookedTransformer`` (or ``HookedEncoder``).
        target: ``[q_pos k_pos]`` or ``[batch q_pos k_pos]`` weights, or a function from the token
            ids ``[batch pos]`` to such a tensor (like ``induction_target``).
        tokens: token ids ``[batch pos]``, a text or a list of texts (padded); by default
            ``repeated_random_tokens`` with ``seq_len``, ``batch``, ``seed`` and ``bos_token_id``.
        attention_mask: for padded ids, 1 = real token (ids padded by ``model.to_tokens`` carry
            theirs). Padding never counts: the model does not attend to it, a target function sees
            each row's real tokens only, and no weight goes from or to a padding position, so a
            padded batch scores as its rows would, pooled, unpadded.
    """
    ids, mask = _model_tokens(model, tokens, seq_len, batch, seed, bos_token_id, attention_mask)
    weights = _padded_target(target, ids, mask)
    return pattern_scores(attention_patterns(model, ids, mask), weights)


def previous_token_scores(
    model: HookedRootModule, tokens: Tensor | str | list[str] | None = None, *, seq_len: int = 20,
    batch: int = 4, seed: int = 0, bos_token_id: int | None = None, attention_mask: Tensor | None = None,
) -> Float[Tensor, "layer head"]:
    """Each head's mean attention from a token to the one before it: ``[layer head]``.
    Arguments as for ``detect_heads``."""
    return detect_heads(model, lambda ids: previous_token_target(ids.shape[1]), tokens, seq_len=seq_len,
                        batch=batch, seed=seed, bos_token_id=bos_token_id,
                        attention_mask=attention_mask)


def first_token_scores(
    model: HookedRootModule, tokens: Tensor | str | list[str] | None = None, *, seq_len: int = 20,
    batch: int = 4, seed: int = 0, bos_token_id: int | None = None, attention_mask: Tensor | None = None,
) -> Float[Tensor, "layer head"]:
    """Each head's mean attention to position 0 (BOS, or whatever token comes first), from every
    query but the first: the attention-sink score, ``[layer head]``. Arguments as for ``detect_heads``."""
    return detect_heads(model, lambda ids: first_token_target(ids.shape[1]), tokens, seq_len=seq_len,
                        batch=batch, seed=seed, bos_token_id=bos_token_id,
                        attention_mask=attention_mask)


def duplicate_token_scores(
    model: HookedRootModule, tokens: Tensor | str | list[str] | None = None, *, seq_len: int = 20,
    batch: int = 4, seed: int = 0, bos_token_id: int | None = None, attention_mask: Tensor | None = None,
) -> Float[Tensor, "layer head"]:
    """Each head's mean attention to earlier copies of the current token, over the queries that have
    one: ``[layer head]``. On repeated random sequences that is the stripe ``k = q - seq_len``.
    Arguments as for ``detect_heads``."""
    return detect_heads(model, duplicate_token_target, tokens, seq_len=seq_len, batch=batch, seed=seed,
                        bos_token_id=bos_token_id, attention_mask=attention_mask)


def induction_scores(
    model: HookedRootModule, tokens: Tensor | str | list[str] | None = None, *, seq_len: int = 20,
    batch: int = 4, seed: int = 0, bos_token_id: int | None = None, attention_mask: Tensor | None = None,
) -> Float[Tensor, "layer head"]:
    """Each head's mean attention to the token after an earlier copy of the current one, over the
    queries that have one: ``[layer head]``. On repeated random sequences that is the stripe
    ``k = q - seq_len + 1`` in the second copy. Arguments as for ``detect_heads``."""
    return detect_heads(model, induction_target, tokens, seq_len=seq_len, batch=batch, seed=seed,
                        bos_token_id=bos_token_id, attention_mask=attention_mask)


__all__ = ["attention_patterns", "detect_heads", "duplicate_token_scores", "duplicate_token_target",
           "first_token_scores", "first_token_target", "induction_scores", "induction_target", "pattern_scores",
           "previous_token_scores", "previous_token_target", "repeated_random_tokens"]
