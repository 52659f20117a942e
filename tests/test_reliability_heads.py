"""Head detectors on a padded batch (issue 18): padding never counts. Before, padded ids lost their
mask (the model attended to padding) and the targets marked padding tokens as duplicates of each
other (and as previous / first tokens), so the scores of a padded batch differed from those of its
rows run unpadded."""

import pytest
import torch

from _reliability import tiny_llama
from hooked_attn.analysis import heads

TEXTS = ["the cat sat on the mat and the cat ran", "hi the hi the", "a dog"]
DETECTORS = {
    "previous": (heads.previous_token_scores, lambda ids: heads.previous_token_target(ids.shape[1])),
    "first": (heads.first_token_scores, lambda ids: heads.first_token_target(ids.shape[1])),
    "duplicate": (heads.duplicate_token_scores, heads.duplicate_token_target),
    "induction": (heads.induction_scores, heads.induction_target),
}


def _pooled_unpadded(model, target_fn):
    """Each row run alone, unpadded; scores pooled over every scored row, as pattern_scores does."""
    on_target, n_rows = 0.0, 0
    for text in TEXTS:
        ids = model.to_tokens(text)
        patterns = heads.attention_patterns(model, ids)  # [layer 1 head q k]
        target = target_fn(ids).float().reshape(1, ids.shape[1], ids.shape[1])
        rows = target.sum(-1) != 0
        on_target = on_target + ((patterns * target[None, :, None]).sum(-1) * rows[None, :, None]).sum((1, 3))
        n_rows += int(rows.sum())
    return on_target / n_rows


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", list(DETECTORS))
def test_a_padded_batch_scores_as_its_rows_unpadded(kind, side):
    model = tiny_llama()
    scores_fn, target_fn = DETECTORS[kind]
    expected = _pooled_unpadded(model, target_fn)
    padded = model.to_tokens(TEXTS, padding_side=side)
    ids, mask = model.tokenize(TEXTS, padding_side=side)
    assert not bool(mask.all())
    for got in (scores_fn(model, padded),  # the mask to_tokens attached
                scores_fn(model, ids.clone(), attention_mask=mask),  # a plain tensor with its mask
                scores_fn(model, TEXTS) if side == "right" else scores_fn(model, ids, attention_mask=mask.bool())):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # a user tensor target loses every weight from or to padding
    target = target_fn(ids).float()
    kept = heads.detect_heads(model, target, ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(kept, heads.pattern_scores(heads.attention_patterns(model, ids, mask),
                                                          target * (real[:, :, None] & real[:, None, :])))


def test_a_mask_of_the_wrong_shape_or_with_texts_is_refused():
    model = tiny_llama()
    ids, mask = model.tokenize(TEXTS)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        heads.duplicate_token_scores(model, ids, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="attention_mask goes with token ids"):
        heads.duplicate_token_scores(model, TEXTS, attention_mask=mask)
    assert model.n_hooks() == 0
