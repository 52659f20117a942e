"""Attention heatmaps as pictures (PNG, SVG, PDF): one head, or a grid of heads, with token labels.

matplotlib is an optional dependency (the ``plots`` extra); it is imported only when a plot is made.
"""

import importlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import Float
from torch import Tensor

from hooked_attn.analysis.patterns import as_batched, attendable, index_in_range
from hooked_attn.analysis.text import visible_token

MASKED_COLOUR = "#d9d9d9"  # keys a query may not attend to: light grey, with hatching
MAX_LABEL = 14
MAX_PANEL_INCHES = 14.0


def _matplotlib() -> tuple[Any, Any]:
    """(matplotlib, matplotlib.pyplot), or an ImportError that names the ``plots`` extra."""
    try:
        return importlib.import_module("matplotlib"), importlib.import_module("matplotlib.pyplot")
    except ImportError:
        raise ImportError("plot_attention needs matplotlib: install the `plots` extra, "
                          "`pip install 'hooked_attn[plots]'` (or `pip install matplotlib`)") from None


def _label(token: str) -> str:
    text = visible_token(token)
    return f"{text[:MAX_LABEL - 1]}…" if len(text) > MAX_LABEL else text


def plot_attention(
    pattern: Float[Tensor, "*batch_head q_pos k_pos"], str_tokens: Sequence[str] | None = None, *,
    heads: int | Sequence[int] | None = None, batch: int = 0, layer: int | None = None,
    path: str | Path | None = None, title: str | None = None, causal: bool = True, cmap: str = "Blues",
    max_cols: int = 4, cell_inches: float = 0.28, dpi: int = 150, query_tokens: Sequence[str] | None = None,
) -> Any:
    """Draw the pattern of one head, or a grid of heads, as a heatmap; optionally save it.

    Queries run down the rows and keys across the columns, both labelled with their tokens (positions
    when ``str_tokens`` is None). Weights share one colour scale from 0 to 1, shown by a colour bar;
    keys a query may not attend to are hatched grey, so they read differently from a weight of 0.

    Args:
        pattern: ``[q_pos k_pos]`` (one head), ``[head q_pos k_pos]`` or ``[batch head q_pos k_pos]``.
        str_tokens: one string per key position (``model.to_str_tokens(text)``).
        heads: one head, a list of heads, or None for every head (a 2-D pattern is a single head).
        batch: the sequence, for a batched pattern.
        layer: only used in the titles ("L3H1").
        path: where to save; the suffix picks the format (``.png``, ``.svg``, ``.pdf``).
        title: a title over the whole figure.
        causal: hatch the keys after each query (False for an encoder's pattern).
        cmap: a matplotlib colour map name.
        max_cols: heads per row of the grid.
        cell_inches: the size of one cell; the figure grows with the number of tokens, up to
            ``MAX_PANEL_INCHES`` a head, after which the cells shrink.
        dpi: resolution of a saved bitmap.
        query_tokens: one label per query, when queries are not the last keys (cross-attention,
            TabPFN's test rows reading training rows); by default the last ``q_pos`` key labels.

    Returns:
        The matplotlib ``Figure`` (close it with ``matplotlib.pyplot.close(fig)`` when done).

    Raises:
        ImportError: matplotlib is not installed (install the ``plots`` extra).
        ValueError: a head or batch index is out of range, or ``str_tokens`` has the wrong length.
    """
    if pattern.ndim == 2:
        grids, head_ids = pattern[None].float().cpu(), [None]
        if heads not in (None, 0):
            raise ValueError(f"a [q_pos k_pos] pattern is a single head; got heads={heads}")
    else:
        full = as_batched(pattern)
        b = index_in_range(batch, full.shape[0], "batch", "batch")
        chosen = range(full.shape[1]) if heads is None else [heads] if isinstance(heads, int) else list(heads)
        if not chosen:
            raise ValueError("heads is an empty list: name at least one head")
        head_ids = [index_in_range(h, full.shape[1], "heads", "head") for h in chosen]
        grids = full[b, head_ids].float().cpu()
    q_pos, k_pos = grids.shape[1:]
    if str_tokens is not None and len(str_tokens) != k_pos:
        raise ValueError(f"str_tokens has {len(str_tokens)} tokens but the pattern has k_pos={k_pos} keys")
    if query_tokens is not None and len(query_tokens) != q_pos:
        raise ValueError(f"query_tokens has {len(query_tokens)} labels but the pattern has q_pos={q_pos} queries")
    if max_cols < 1:
        raise ValueError(f"max_cols must be at least 1, got {max_cols}")
    matplotlib, plt = _matplotlib()
    rectangle = importlib.import_module("matplotlib.patches").Rectangle

    tokens = list(str_tokens) if str_tokens is not None else [str(k) for k in range(k_pos)]
    key_labels = [_label(t) for t in tokens]
    query_labels = key_labels[k_pos - q_pos:] if query_tokens is None else [_label(t) for t in query_tokens]
    masked = ~attendable(q_pos, k_pos, causal)[0].numpy()
    n = len(head_ids)
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    label_room = 0.09 * max(len(label) for label in key_labels) + 0.4  # inches for the tick labels
    cell = min(cell_inches, MAX_PANEL_INCHES / max(q_pos, k_pos))  # long prompts: smaller cells
    side = max(1.6, cell * max(q_pos, k_pos))
    fig_w = cols * (side + label_room) + 1.2
    fig_h = rows * (side + label_room + 0.35) + (0.5 if title else 0.1)
    fig, axes = plt.subplots(rows, cols, figsize=(fig_w, fig_h), squeeze=False, layout="constrained")
    colours = matplotlib.colormaps[cmap].copy()
    font = max(3.0, min(9.0, 0.5 * 72 * cell))  # points: about half a cell
    image = None
    for index, ax in enumerate(axes.flat):
        if index >= n:
            ax.set_visible(False)
            continue
        values = np.ma.masked_array(grids[index].numpy(), mask=masked)
        ax.set_facecolor(MASKED_COLOUR)
        # The masked cells of the image are transparent: the grey face and this hatching show through.
        ax.add_patch(rectangle((-0.5, -0.5), k_pos, q_pos, fill=False, hatch="///", edgecolor="#b0b0b0",
                               linewidth=0, zorder=0))
        image = ax.imshow(values, cmap=colours, vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal",
                          zorder=1)
        ax.set_xticks(range(k_pos), key_labels, rotation=90, fontsize=font)
        ax.set_yticks(range(q_pos), query_labels, fontsize=font)
        ax.tick_params(length=0)
        head_id = head_ids[index]
        name = "" if head_id is None else (f"L{layer}H{head_id}" if layer is not None else f"head {head_id}")
        if name:
            ax.set_title(name, fontsize=10)
        if index % cols == 0:
            ax.set_ylabel("query", fontsize=9)
        if index >= n - cols:
            ax.set_xlabel("key", fontsize=9)
        for spine in ax.spines.values():
            spine.set_visible(False)
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9 if rows == 1 else 0.6, aspect=30, pad=0.02)
    bar.set_label("attention weight (hatched grey: masked)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    if path is not None:
        fig.savefig(Path(path), dpi=dpi)
    return fig


__all__ = ["plot_attention"]
