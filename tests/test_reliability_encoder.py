"""HookedEncoder under hostile input, checked against HF BERT."""

import pytest
import torch
import transformers

from _reliability import word_tokenizer
from conftest import randomize_
from hooked_attn import HookedEncoder


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=18, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=16, type_vocab_size=2, pad_token_id=1)
    hf = randomize_(transformers.BertForMaskedLM(cfg).eval())
    return hf, HookedEncoder.from_pretrained(hf, tokenizer=word_tokenizer(), center_unembed=False)


def test_a_mask_given_with_text_is_applied(bert):
    """It was dropped: the text's own all-ones mask replaced it."""
    hf, model = bert
    mask = torch.tensor([[1, 1, 1, 0]])
    ids = model.to_tokens("the cat sat on")
    assert ids.shape == mask.shape
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        torch.testing.assert_close(model("the cat sat on", attention_mask=mask), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 3\), but the text tokenizes to \(1, 4\)"):
        model("the cat sat on", attention_mask=torch.ones(1, 3))


def test_ids_and_token_types_of_other_dtypes(bert):
    hf, model = bert
    ids = torch.tensor([[2, 4, 5, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids.to(torch.uint8)), hf(ids).logits, atol=1e-5, rtol=1e-5)
    for bad_call, message in ((lambda: model(ids.bool()), "expected token ids"),
                              (lambda: model(ids, token_type_ids=torch.zeros(1, 4)), "token_type_ids must be integer ids")):
        with pytest.raises(ValueError, match=message):
            bad_call()
