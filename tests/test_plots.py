"""plot_attention: what is drawn is the pattern (values, masked cells, labels), files are written in the
format their suffix names, and a missing matplotlib gives an ImportError naming the `plots` extra."""

import sys

import matplotlib
import numpy as np
import pytest
import torch

from hooked_attn.analysis import plot_attention
from hooked_attn.analysis.plots import plot_attention as plot_attention_direct

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the non-interactive backend

TOKENS = ["<s>", "The", " cat", " sat", "\n", "."]


def random_causal(batch: int, heads: int, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    future = ~torch.ones(n, n, dtype=torch.bool).tril()
    return torch.randn(batch, heads, n, n, generator=gen).masked_fill(future, -torch.inf).softmax(-1)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def heatmap_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.images and ax.get_label() != "<colorbar>"]


def test_one_head_draws_the_pattern_with_labels_and_a_colour_bar(tmp_path):
    pattern = random_causal(2, 3, 6)
    path = tmp_path / "head.png"
    fig = plot_attention(pattern, TOKENS, heads=1, batch=1, layer=4, path=path)
    assert plot_attention is plot_attention_direct
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = heatmap_axes(fig)
    assert ax.get_title() == "L4H1"
    image = ax.images[0]
    drawn = image.get_array()
    np.testing.assert_allclose(drawn.data[~drawn.mask], pattern[1, 1].numpy()[~drawn.mask], rtol=0, atol=0)
    assert drawn.mask.tolist() == (~torch.ones(6, 6, dtype=torch.bool).tril()).tolist()  # the future is masked
    assert image.get_clim() == (0.0, 1.0)
    shown = ["<s>", "The", "␣cat", "␣sat", "⏎", "."]
    assert [t.get_text() for t in ax.get_xticklabels()] == shown
    assert [t.get_text() for t in ax.get_yticklabels()] == shown
    colorbars = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert len(colorbars) == 1 and "attention weight" in colorbars[0].get_ylabel()
    # Masked cells show the grey face and the hatching, which no weight's colour matches.
    assert ax.get_facecolor()[:3] != image.cmap(0.0)[:3]
    assert any(patch.get_hatch() for patch in ax.patches)


def test_grid_of_heads_and_svg(tmp_path):
    pattern = random_causal(1, 5, 4)[0]  # [head q_pos k_pos]
    fig = plot_attention(pattern, TOKENS[:4], layer=2, path=tmp_path / "grid.svg", max_cols=2, title="all heads")
    axes = heatmap_axes(fig)
    assert [ax.get_title() for ax in axes] == [f"L2H{h}" for h in range(5)]
    for head, ax in enumerate(axes):
        np.testing.assert_array_equal(ax.images[0].get_array().filled(-1)[np.tril_indices(4)],
                                      pattern[head].numpy()[np.tril_indices(4)])
    assert fig._suptitle.get_text() == "all heads"
    assert (tmp_path / "grid.svg").read_text().lstrip().startswith("<?xml")

    chosen = plot_attention(pattern, heads=[4, 0])
    assert [ax.get_title() for ax in heatmap_axes(chosen)] == ["head 4", "head 0"]
    assert [t.get_text() for t in heatmap_axes(chosen)[0].get_xticklabels()] == ["0", "1", "2", "3"]


def test_kv_cached_and_two_dimensional_patterns():
    # Two queries over five keys: query i sits at key position i + 3.
    pattern = torch.tensor([[0.2, 0.2, 0.2, 0.4, 0.0], [0.1, 0.1, 0.1, 0.1, 0.6]])
    fig = plot_attention(pattern, ["a", "b", "c", "d", "e"])
    (ax,) = heatmap_axes(fig)
    assert ax.images[0].get_array().mask.tolist() == [[False] * 4 + [True], [False] * 5]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["d", "e"]


def test_bad_arguments(tmp_path):
    pattern = random_causal(1, 2, 4)
    with pytest.raises(ValueError, match=r"heads=2 is out of range: head has size 2"):
        plot_attention(pattern, heads=2)
    with pytest.raises(ValueError, match="str_tokens has 3 tokens but the pattern has k_pos=4"):
        plot_attention(pattern, ["a", "b", "c"])
    with pytest.raises(ValueError, match="single head"):
        plot_attention(pattern[0, 0], heads=1)
    with pytest.raises(ValueError, match="batch=1 is out of range"):
        plot_attention(pattern, batch=1)


def test_missing_matplotlib_names_the_plots_extra(monkeypatch):
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import matplotlib...` raise ImportError
    with pytest.raises(ImportError, match=r"install the `plots` extra, `pip install 'hooked_attn\[plots\]'`"):
        plot_attention(random_causal(1, 1, 3))
