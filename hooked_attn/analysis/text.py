"""Attention for terminals: a query-by-key heatmap of one head with token labels, and top-k tables.

Plain text by default (one digit per cell, so the output is easy to read in a log and to test);
``color=True`` draws each cell as Unicode blocks in a 256-colour ANSI ramp, for an interactive terminal.
"""

from collections.abc import Sequence

from jaxtyping import Float
from torch import Tensor

from hooked_attn.analysis.patterns import (
    AttendedKey, as_batched, attendable, index_in_range, top_k_keys, top_k_per_head,
)

MASKED = " "  # a key the query may not attend to (the future, in a causal model)
LABEL_ROWS = 6  # how many characters of each key's token are written down its column
COLOUR_RAMP = (53, 54, 61, 67, 30, 36, 72, 113, 148, 220)  # xterm-256 colours close to viridis
_VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍"}


def visible_token(token: str) -> str:
    """The token with whitespace made visible (``" the"`` becomes ``"␣the"``), and ``"∅"`` for ``""``."""
    return "".join(_VISIBLE.get(ch, ch) for ch in token) or "∅"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _digit(weight: float) -> str:
    """``.`` below 0.1, else the tenths digit: 0.37 -> 3, 1.0 -> 9."""
    tenths = min(9, int(weight * 10 + 1e-5))  # float32 0.9 is 0.89999998: still a 9
    return "." if tenths <= 0 else str(tenths)


def _shade(weight: float) -> str:
    """A 256-colour cell: two full blocks whose colour runs from dark purple (0) to yellow (1), a ramp
    that reads on dark and light terminals alike (a blank cell stays free for masked keys)."""
    level = max(0.0, min(1.0, weight))
    colour = COLOUR_RAMP[min(len(COLOUR_RAMP) - 1, int(level * len(COLOUR_RAMP)))]
    return f"\x1b[38;5;{colour}m██\x1b[0m"


def _select_head(pattern: Tensor, head: int, batch: int) -> Tensor:
    if pattern.ndim == 2:
        return pattern
    full = as_batched(pattern)
    b = index_in_range(batch, full.shape[0], "batch", "batch")
    return full[b, index_in_range(head, full.shape[1], "head", "head")]


def text_heatmap(
    pattern: Float[Tensor, "*batch_head q_pos k_pos"], str_tokens: Sequence[str] | None = None, *,
    head: int = 0, batch: int = 0, max_tokens: int = 40, color: bool = False, label_width: int = 12,
    causal: bool = True, title: str | None = None,
) -> str:
    """A query-by-key grid of one head: one row per query, one column per key.

    Each cell is the weight in tenths (``.`` below 0.1, ``9`` for 0.9 and above); a blank cell is a
    key the query may not attend to. Rows are labelled ``position token``; each key's token is written
    down its column above the grid. With more than ``max_tokens`` positions only the last
    ``max_tokens`` queries and keys are drawn; a header line says so, and a ``<`` column holds the
    weight each row puts on the keys left out.

    Args:
        pattern: ``[q_pos k_pos]``, ``[head q_pos k_pos]`` or ``[batch head q_pos k_pos]``.
        str_tokens: one string per key position (as ``model.to_str_tokens`` gives); positions otherwise.
        head, batch: which head and sequence, for patterns that have those axes.
        max_tokens: the most queries and keys drawn.
        color: draw cells as blocks coloured by 256-colour ANSI escapes (dark purple 0 to yellow 1)
            instead of digits.
        label_width: the most characters of a row label (position and token).
        causal: leave the keys after each query blank (False for an encoder's pattern).
        title: a first line, such as ``"layer 3 head 1"``.
    """
    grid = _select_head(pattern, head, batch).float().cpu()
    q_pos, k_pos = grid.shape
    if str_tokens is not None and len(str_tokens) != k_pos:
        raise ValueError(f"str_tokens has {len(str_tokens)} tokens but the pattern has k_pos={k_pos} keys")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    labels = [visible_token(t) for t in str_tokens] if str_tokens is not None else [str(k) for k in range(k_pos)]
    allowed = attendable(q_pos, k_pos, causal)[0]
    q_start, k_start = max(0, q_pos - max_tokens), max(0, k_pos - max_tokens)
    offset = k_pos - q_pos  # query i sits at key position i + offset
    hidden = k_start > 0

    lines = [title] if title else []
    if q_start or k_start:
        lines.append(f"showing the last {q_pos - q_start} of {q_pos} queries and the last {k_pos - k_start} of "
                     f"{k_pos} keys (positions {k_start}..{k_pos - 1}); column < is the weight on keys "
                     f"0..{k_start - 1}")
    lines.append("cells: weight in tenths (. < 0.1, 9 >= 0.9), blank: masked" if not color else
                 "cells: weight from 0 to 1 as " + "".join(_shade(w) for w in (0.0, 0.25, 0.5, 0.75, 1.0))
                 + ", blank: masked")
    digits = len(str(k_pos - 1))
    row_labels = {q: _clip(f"{q + offset:>{digits}} {labels[q + offset]}", label_width) for q in range(q_start, q_pos)}
    label_width = max(len(label) for label in row_labels.values())
    pad = " " * (label_width + 1) + ("  " if hidden else "")
    shown_keys = range(k_start, k_pos)
    for row in range(LABEL_ROWS):  # key labels, written downwards
        chars = [labels[k][row] if row < len(labels[k]) else " " for k in shown_keys]
        if all(ch == " " for ch in chars):
            break
        lines.append((pad + " ".join(chars)).rstrip())
    index_pad = " " * (label_width + 1) + ("< " if hidden else "")
    lines.append(index_pad + " ".join(str(k % 10) for k in shown_keys))  # last digit of each key position
    for q in range(q_start, q_pos):
        label = row_labels[q]
        cells = []
        for k in shown_keys:
            weight = float(grid[q, k])
            if not allowed[q, k]:
                cells.append(MASKED * 2 if color else MASKED)
            else:
                cells.append(_shade(weight) if color else _digit(weight))
        rest = f"{_digit(float(grid[q, :k_start].sum()))} " if hidden else ""
        joiner = "" if color else " "
        lines.append(f"{label:<{label_width}} {rest}{joiner.join(cells)}".rstrip())
    return "\n".join(lines)


def _key_text(key: AttendedKey, width: int) -> str:
    token = "" if key.token is None else visible_token(key.token)
    return _clip(f"{key.position}:{token}" if token else str(key.position), width)


def top_k_table(
    pattern: Float[Tensor, "*batch head q_pos k_pos"], query: int, str_tokens: Sequence[str] | None = None, *,
    head: int | None = None, k: int = 5, batch: int = 0,
) -> str:
    """The keys a query attends to most, as a table.

    With ``head`` given: one line per key (rank, position, token, weight). Without it: one line per
    head, its top ``k`` keys side by side as ``position:token weight``.

    Args:
        pattern: ``[batch head q_pos k_pos]`` or ``[head q_pos k_pos]``.
        query: the query position (negative counts from the end).
        str_tokens: one string per key position, to label the keys.
        head: one head, or None for every head.
        k: how many keys.
        batch: the sequence, for a batched pattern.
    """
    full = as_batched(pattern)
    q = index_in_range(query, full.shape[2], "query", "q_pos")
    absolute = q + full.shape[3] - full.shape[2]
    who = f"query {absolute}" + ("" if str_tokens is None else f" {visible_token(str_tokens[absolute])!r}")
    if head is not None:
        keys = top_k_keys(full, q, head, k, str_tokens, batch)
        lines = [f"top {len(keys)} keys for {who}, head {head}", f"{'rank':>4}  {'pos':>4}  {'token':<16} weight"]
        lines += [f"{rank:>4}  {key.position:>4}  {_clip(visible_token(key.token or ''), 16):<16} {key.weight:.4f}"
                  for rank, key in enumerate(keys, start=1)]
        return "\n".join(lines)
    per_head = top_k_per_head(full, q, k, str_tokens, batch)
    lines = [f"top {min(k, full.shape[3])} keys for {who}, every head (position:token weight)"]
    for h, keys in enumerate(per_head):
        lines.append(f"head {h:>2}  " + "  ".join(f"{_key_text(key, 14):>14} {key.weight:.3f}" for key in keys))
    return "\n".join(lines)


__all__ = ["text_heatmap", "top_k_table", "visible_token"]
