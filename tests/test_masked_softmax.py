"""masked_softmax: valid lengths per sequence or per query, boolean masks, rows with no valid key."""

import jaxtyping
import pytest
import torch
from conftest import TOL

from hooked_attn import masked_softmax


@pytest.fixture
def no_runtime_typecheck(monkeypatch):
    """Let the function's own input checks speak (the test run's jaxtyping checks would answer first)."""
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)


def reference(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Row by row: softmax over the kept keys only, zeros elsewhere (and for rows with no kept key)."""
    out = torch.zeros_like(scores)
    flat_scores, flat_keep, flat_out = scores.reshape(-1, scores.shape[-1]), keep.reshape(-1, keep.shape[-1]), \
        out.view(-1, out.shape[-1])
    for row in range(flat_scores.shape[0]):
        kept = flat_keep[row]
        if kept.any():
            flat_out[row, kept] = torch.softmax(flat_scores[row, kept], dim=0)
    return out


def test_valid_lens_per_sequence() -> None:
    scores = torch.randn(3, 4, 6)
    valid_lens = torch.tensor([6, 2, 0])
    keep = (torch.arange(6) < valid_lens[:, None])[:, None, :].expand(3, 4, 6)
    pattern = masked_softmax(scores, valid_lens=valid_lens)
    torch.testing.assert_close(pattern, reference(scores, keep), **TOL["tiny_fp32"])
    assert (pattern[1, :, 2:] == 0).all() and (pattern[2] == 0).all()  # exact zeros; a fully masked row is zeros
    torch.testing.assert_close(pattern[:2].sum(-1), torch.ones(2, 4), **TOL["tiny_fp32"])


def test_valid_lens_per_query_with_a_head_axis() -> None:
    scores = torch.randn(2, 3, 4, 5)  # [batch head q_pos k_pos]
    valid_lens = torch.tensor([[1, 2, 3, 4], [5, 5, 0, 1]])  # [batch q_pos]
    keep = (torch.arange(5) < valid_lens[..., None])[:, None].expand(2, 3, 4, 5)
    torch.testing.assert_close(masked_softmax(scores, valid_lens=valid_lens), reference(scores, keep),
                               **TOL["tiny_fp32"])


def test_boolean_mask_broadcasts_and_combines_with_valid_lens() -> None:
    scores = torch.randn(2, 4, 4)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()  # True = may attend
    torch.testing.assert_close(masked_softmax(scores, mask=causal), reference(scores, causal.expand(2, 4, 4)),
                               **TOL["tiny_fp32"])
    valid_lens = torch.tensor([4, 2])
    both = causal & (torch.arange(4) < valid_lens[:, None, None])
    pattern = masked_softmax(scores, mask=causal, valid_lens=valid_lens)
    torch.testing.assert_close(pattern, reference(scores, both), **TOL["tiny_fp32"])
    assert (pattern[~both] == 0).all()


def test_no_mask_is_a_plain_softmax() -> None:
    scores = torch.randn(2, 3, 5)
    torch.testing.assert_close(masked_softmax(scores), scores.softmax(-1), rtol=0, atol=0)


def test_rows_with_no_valid_key_have_finite_gradients() -> None:
    scores = torch.randn(2, 3, 4, requires_grad=True)
    pattern = masked_softmax(scores, valid_lens=torch.tensor([0, 3]))
    (pattern * torch.randn(2, 3, 4)).sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert (scores.grad[0] == 0).all() and (scores.grad[1, :, 3] == 0).all()  # nothing flows from masked keys


def test_low_precision_scores_keep_their_dtype() -> None:
    scores = torch.randn(2, 3, 5)
    valid_lens = torch.tensor([3, 5])
    pattern = masked_softmax(scores.bfloat16(), valid_lens=valid_lens)
    assert pattern.dtype == torch.bfloat16
    torch.testing.assert_close(pattern.float(), masked_softmax(scores, valid_lens=valid_lens), atol=1e-2, rtol=0)


def test_bad_inputs_raise_errors_that_name_them(no_runtime_typecheck) -> None:
    scores = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"valid_lens must lie in 0..5.*\[-1, 2\]"):
        masked_softmax(scores, valid_lens=torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match=r"valid_lens must lie in 0..5.*\[6, 2\]"):
        masked_softmax(scores, valid_lens=torch.tensor([6, 2]))
    with pytest.raises(ValueError, match=r"valid_lens must be \[batch\] or \[batch q_pos\] with q_pos=3"):
        masked_softmax(scores, valid_lens=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="valid_lens has batch size 3 but scores have batch size 2"):
        masked_softmax(scores, valid_lens=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="valid_lens must hold integers, got dtype torch.float32"):
        masked_softmax(scores, valid_lens=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        masked_softmax(scores, mask=torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"mask of shape \(4, 5\) does not broadcast to scores of shape \(2, 3, 5\)"):
        masked_softmax(scores, mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="scores must be"):
        masked_softmax(torch.randn(3, 5))


def test_annotations_reject_mismatched_shapes_under_runtime_checks() -> None:
    with pytest.raises(TypeError):  # jaxtyping's TypeCheckError: batch 3 against batch 2
        masked_softmax(torch.randn(2, 3, 5), valid_lens=torch.tensor([1, 2, 3]))
