"""A self-contained interactive HTML page for a prompt's attention patterns (no CDN, no network).

The page inlines its CSS, its JavaScript and the patterns themselves (base64 float32), so it opens
from a file anywhere, offline; a Content-Security-Policy forbids it to load anything. Pick a layer
and a head (or the mean of the heads), hover a token to see what it attends to and what attends to
it, with the top keys and queries listed; a heatmap of the chosen head sits below.
"""

import base64
import html
import json
import logging
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from hooked_attn.analysis.patterns import index_in_range, pattern_names, stack_patterns

logger = logging.getLogger(__name__)

LARGE_PAGE_BYTES = 20_000_000  # above this, warn: the browser will be slow to open the page


def _asset(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def _script_safe_json(data: object) -> str:
    """JSON that cannot end the ``<script>`` element holding it (``<`` is written as ``\\u003c``)."""
    return json.dumps(data, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class AttentionViewer:
    """The viewer for one sequence: ``save(path)`` writes the page; in Jupyter it renders inline.

    Build one with ``attention_viewer``. ``html`` is the whole page as a string.
    """

    def __init__(
        self, patterns: Float[Tensor, "layer head q_pos k_pos"], str_tokens: Sequence[str],
        layers: Sequence[int], title: str, top_k: int, causal: bool, start: tuple[int, int] = (0, 0),
    ) -> None:
        self.patterns = patterns
        self.start = start  # (index into layers, head) the page opens at
        self.str_tokens = list(str_tokens)
        self.layers = list(layers)
        self.title = title
        self.top_k = top_k
        self.causal = causal
        self._html: str | None = None

    @property
    def html(self) -> str:
        """The page: one HTML document with its CSS, JavaScript and data inline."""
        if self._html is None:
            _, n_heads, q_pos, k_pos = self.patterns.shape
            values = np.ascontiguousarray(self.patterns.detach().float().cpu().numpy(), dtype="<f4")
            data = {
                "tokens": self.str_tokens, "layers": self.layers, "n_heads": n_heads, "q_pos": q_pos,
                "k_pos": k_pos, "top_k": self.top_k, "causal": self.causal,
                "start_layer": self.start[0], "start_head": self.start[1],
                "patterns": base64.b64encode(values.tobytes()).decode("ascii"),
            }
            page = _asset("template.html")
            for key, value in (("__CSS__", _asset("viewer.css")), ("__JS__", _asset("viewer.js")),
                               ("__TITLE__", html.escape(self.title)), ("__DATA__", _script_safe_json(data))):
                page = page.replace(key, value)
            if len(page) > LARGE_PAGE_BYTES:
                logger.warning("the attention viewer page is %.0f MB: pass fewer layers or a shorter prompt",
                               len(page) / 1e6)
            self._html = page
        return self._html

    def save(self, path: str | Path) -> Path:
        """Write the page to ``path`` (UTF-8) and return the path."""
        path = Path(path)
        path.write_text(self.html, encoding="utf-8")
        return path

    def _repr_html_(self) -> str:
        """Jupyter's inline view: the page in an iframe, so its script and styles stay its own."""
        height = 420 + 16 * len(self.str_tokens) + 14 * min(len(self.str_tokens), 60)
        return (f'<iframe srcdoc="{html.escape(self.html, quote=True)}" title="{html.escape(self.title)}" '
                f'style="width: 100%; height: {height}px; border: 1px solid #ddd;"></iframe>')

    def __repr__(self) -> str:
        n_layers, n_heads, _, k_pos = self.patterns.shape
        return f"AttentionViewer({self.title!r}: {n_layers} layers, {n_heads} heads, {k_pos} tokens)"


def attention_viewer(
    patterns: Float[Tensor, "*stack q_pos k_pos"] | Mapping[str, Tensor], str_tokens: Sequence[str], *,
    layers: Sequence[int] | None = None, batch: int = 0, title: str | None = None, top_k: int = 5,
    causal: bool = True, layer: int | None = None, head: int = 0,
) -> AttentionViewer:
    """The interactive viewer for one sequence's attention patterns.

    Args:
        patterns: an ``ActivationCache`` (or any mapping of hook name to tensor) holding
            ``blocks.{L}.attn.hook_pattern``, or a ``[layer batch head q_pos k_pos]`` stack such as
            ``stack_patterns`` and ``attention_patterns`` return.
        str_tokens: one string per key position (``model.to_str_tokens(text)``).
        layers: with a cache, which layers to include (all cached ones by default); with a stack,
            the layer number of each entry (``0, 1, ...`` by default), shown in the layer menu.
        batch: which sequence of the batch.
        title: the page title; by default it quotes the text.
        top_k: how many keys the top lists show at first (the page can change it).
        causal: whether keys after a query are masked (False for an encoder).
        layer, head: the layer number (one of ``layers``; default the first) and head the page opens at.

    Returns:
        An ``AttentionViewer``: ``.save(path)`` writes the page, ``.html`` is its text, and in Jupyter
        it renders inline.
    """
    if isinstance(patterns, Mapping):
        stack = stack_patterns(patterns, layers)
        numbers = list(layers) if layers is not None else list(pattern_names(patterns))
    else:
        if patterns.ndim != 5:
            raise ValueError(f"patterns must be a cache or a [layer batch head q_pos k_pos] stack, got shape "
                             f"{tuple(patterns.shape)}")
        stack = patterns
        numbers = list(layers) if layers is not None else list(range(stack.shape[0]))
        if len(numbers) != stack.shape[0]:
            raise ValueError(f"layers names {len(numbers)} layers but the stack holds {stack.shape[0]}")
    b = index_in_range(batch, stack.shape[1], "batch", "batch")
    if len(str_tokens) != stack.shape[-1]:
        raise ValueError(f"str_tokens has {len(str_tokens)} tokens but the patterns have k_pos={stack.shape[-1]} keys")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if title is None:
        text = "".join(str_tokens)
        title = f"attention: {text[:80]!r}" + ("…" if len(text) > 80 else "")
    if layer is not None and layer not in numbers:
        raise ValueError(f"layer={layer} is not among the viewer's layers {numbers}")
    start = (numbers.index(layer) if layer is not None else 0, index_in_range(head, stack.shape[2], "head", "heads"))
    return AttentionViewer(stack[:, b].detach().to(torch.float32).cpu(), str_tokens, numbers, title, top_k, causal,
                           start)


__all__ = ["AttentionViewer", "attention_viewer"]
