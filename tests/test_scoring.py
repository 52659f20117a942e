"""DotProductAttention and AdditiveAttention against their formulas, their hooks, and wrap() around them."""

import math

import jaxtyping
import pytest
import torch
from conftest import TOL
from torch import nn

from hooked_attn import AdditiveAttention, DotProductAttention, unwrap, wrap

BATCH, Q_POS, K_POS, D_KEY, D_VALUE = 2, 3, 5, 4, 6


@pytest.fixture
def no_runtime_typecheck(monkeypatch):
    """Let the modules' own input checks speak (the test run's jaxtyping checks would answer first)."""
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)


def inputs(d_query: int = D_KEY, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, Q_POS, d_query, generator=gen), torch.randn(BATCH, K_POS, D_KEY, generator=gen),
            torch.randn(BATCH, K_POS, D_VALUE, generator=gen))


def by_formula(score, queries, keys, values, n_valid) -> torch.Tensor:
    """One query at a time: weights = softmax of score(q, k) over the first n_valid[b][i] keys."""
    out = torch.zeros(BATCH, Q_POS, D_VALUE)
    for b in range(BATCH):
        for i in range(Q_POS):
            n = n_valid[b][i]
            if n == 0:
                continue
            weights = torch.softmax(torch.stack([score(queries[b, i], keys[b, j]) for j in range(n)]), dim=0)
            out[b, i] = sum(w * values[b, j] for j, w in enumerate(weights))
    return out


VALID_LENS = {
    "none": (None, [[K_POS] * Q_POS] * BATCH),
    "per_sequence": (torch.tensor([5, 2]), [[5] * Q_POS, [2] * Q_POS]),
    "per_query": (torch.tensor([[1, 3, 5], [2, 0, 4]]), [[1, 3, 5], [2, 0, 4]]),
}


@pytest.mark.parametrize("lens", list(VALID_LENS))
def test_dot_product_attention_matches_its_formula(lens: str) -> None:
    valid_lens, n_valid = VALID_LENS[lens]
    queries, keys, values = inputs()
    attention = DotProductAttention().eval()
    expected = by_formula(lambda q, k: q @ k / math.sqrt(D_KEY), queries, keys, values, n_valid)
    torch.testing.assert_close(attention(queries, keys, values, valid_lens), expected, **TOL["tiny_fp32"])


@pytest.mark.parametrize("lens", list(VALID_LENS))
def test_additive_attention_matches_its_formula(lens: str) -> None:
    valid_lens, n_valid = VALID_LENS[lens]
    queries, keys, values = inputs(d_query=7)
    torch.manual_seed(0)
    attention = AdditiveAttention(d_query=7, d_key=D_KEY, d_hidden=8).eval()
    W_q, W_k, w_v = attention.W_q.weight, attention.W_k.weight, attention.w_v.weight[0]

    def score(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return w_v @ torch.tanh(W_q @ q + W_k @ k)

    expected = by_formula(score, queries, keys, values, n_valid)
    with torch.no_grad():
        torch.testing.assert_close(attention(queries, keys, values, valid_lens), expected, **TOL["tiny_fp32"])


def test_a_boolean_mask_combines_with_valid_lens() -> None:
    queries, keys, values = inputs()
    attention = DotProductAttention()
    causal = torch.ones(Q_POS, K_POS, dtype=torch.bool).tril()  # query i sees keys 0..i
    n_valid = [[min(i + 1, 5) for i in range(Q_POS)], [min(i + 1, 2) for i in range(Q_POS)]]
    expected = by_formula(lambda q, k: q @ k / math.sqrt(D_KEY), queries, keys, values, n_valid)
    out = attention(queries, keys, values, valid_lens=torch.tensor([5, 2]), mask=causal[None])
    torch.testing.assert_close(out, expected, **TOL["tiny_fp32"])


@pytest.mark.parametrize("module", ["dot_product", "additive"])
def test_hooks_fire_with_single_head_shapes(module: str) -> None:
    attention = DotProductAttention() if module == "dot_product" else AdditiveAttention(D_KEY, D_KEY, 8)
    wrapped = wrap(attention)
    queries, keys, values = inputs()
    valid_lens = torch.tensor([5, 2])
    out, cache = wrapped.run_with_cache(queries, keys, values, valid_lens)
    assert cache["hook_attn_scores"].shape == cache["hook_pattern"].shape == (BATCH, Q_POS, K_POS)
    assert cache["hook_z"].shape == (BATCH, Q_POS, D_VALUE)
    torch.testing.assert_close(cache["hook_z"], out, rtol=0, atol=0)
    assert (cache["hook_pattern"][1, :, 2:] == 0).all() and torch.isneginf(cache["hook_attn_scores"][1, :, 2:]).all()
    torch.testing.assert_close(cache["hook_pattern"].sum(-1), torch.ones(BATCH, Q_POS), **TOL["tiny_fp32"])
    if module == "additive":
        assert cache["hook_q"].shape == (BATCH, Q_POS, 8) and cache["hook_k"].shape == (BATCH, K_POS, 8)
    assert unwrap(wrapped) is attention


def test_editing_a_masked_score_cannot_unmask_it() -> None:
    wrapped = wrap(DotProductAttention())
    queries, keys, values = inputs()
    valid_lens = torch.tensor([5, 2])
    clean = wrapped(queries, keys, values, valid_lens)
    flattened = wrapped.run_with_hooks(queries, keys, values, valid_lens,
                                       fwd_hooks=[("hook_attn_scores", lambda s, hook: torch.zeros_like(s))])
    torch.testing.assert_close(flattened[1], values[1, :2].mean(0).expand(Q_POS, D_VALUE), **TOL["tiny_fp32"])
    assert not torch.allclose(flattened, clean)


def test_dropout_acts_in_training_mode_only() -> None:
    attention = DotProductAttention(dropout=0.5)
    queries, keys, values = inputs()
    torch.manual_seed(0)
    assert not torch.allclose(attention(queries, keys, values), attention(queries, keys, values))
    attention.eval()
    torch.testing.assert_close(attention(queries, keys, values), attention(queries, keys, values), rtol=0, atol=0)


def test_wrap_names_the_hooks_of_scoring_modules_inside_a_model() -> None:
    class Seq2SeqAttention(nn.Module):
        """A toy encoder-decoder step: Bahdanau attention over the encoder, then self-attention."""

        def __init__(self) -> None:
            super().__init__()
            self.cross = AdditiveAttention(D_KEY, D_KEY, 8)
            self.self_attention = nn.MultiheadAttention(D_VALUE, 2, batch_first=True)

        def forward(self, queries, keys, values, valid_lens):
            context = self.cross(queries, keys, values, valid_lens)
            return self.self_attention(context, context, context)[0]

    torch.manual_seed(0)
    model = Seq2SeqAttention().eval()
    queries, keys, values = inputs()
    valid_lens = torch.tensor([5, 2])
    expected = model(queries, keys, values, valid_lens)
    wrapped = wrap(model)
    assert {"cross.hook_pattern", "self_attention.hook_pattern"} <= set(wrapped.hook_dict)
    out, cache = wrapped.run_with_cache(queries, keys, values, valid_lens,
                                        names_filter=lambda name: name.endswith("hook_pattern"))
    torch.testing.assert_close(out, expected, **TOL["tiny_fp32"])
    assert cache["cross.hook_pattern"].shape == (BATCH, Q_POS, K_POS)
    assert cache["self_attention.hook_pattern"].shape == (BATCH, 2, Q_POS, Q_POS)
    assert unwrap(wrapped) is model and type(model.self_attention) is nn.MultiheadAttention


def test_bad_arguments_raise_errors_that_name_them(no_runtime_typecheck) -> None:
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.5"):
        DotProductAttention(dropout=1.5)
    with pytest.raises(ValueError, match="d_hidden must be positive, got 0"):
        AdditiveAttention(4, 4, 0)
    queries, keys, values = inputs()
    with pytest.raises(ValueError, match="valid_lens has batch size 3 but the queries have batch size 2"):
        DotProductAttention()(queries, keys, values, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        DotProductAttention()(queries, keys, values, mask=torch.ones(Q_POS, K_POS))
