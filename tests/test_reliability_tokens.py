"""Tokenizing, decoding and generate's arguments under hostile input: a clear error, never a quiet guess."""

import jaxtyping
import pytest
import torch

from _reliability import tiny_gpt2, tiny_llama


@pytest.fixture
def untyped(monkeypatch):
    """Let the library's own checks speak: outside this test suite no jaxtyping check answers first."""
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.mark.parametrize("side", ["middle", "Left", ""])
def test_an_unknown_padding_side_is_refused(llama, untyped, side):
    """It padded on the right, whatever was asked."""
    for call in (llama.to_tokens, llama.tokenize):
        with pytest.raises(ValueError, match="padding_side must be 'left', 'right' or None"):
            call(["the cat sat", "a"], padding_side=side)


@pytest.mark.parametrize("ids", [torch.tensor([4, 400]), torch.tensor([[4], [-1]]), [5, 18]])
def test_decoding_ids_outside_the_vocabulary_is_refused(llama, ids):
    """The tokenizer decoded 400 as nothing at all (a silent empty string) and -1 as an OverflowError."""
    with pytest.raises(ValueError, match=r"token id (400|-1|18) is out of range: the vocabulary has ids 0..17"):
        llama.to_string(ids)
    with pytest.raises(ValueError, match="out of range"):
        llama.to_str_tokens(ids)


def test_decoding_still_works(llama):
    assert llama.to_string(torch.tensor([[4, 5], [6, 7]])) == ["the cat", "sat on"]
    assert llama.to_string([]) == "" and llama.to_str_tokens([]) == []
    with pytest.raises(ValueError, match=r"expected token ids \[pos\] or \[batch pos\]"):
        llama.to_string(torch.tensor([4.0, 5.0]))


def test_generating_past_the_learned_positions_is_refused_before_the_first_step():
    """It ran until the position ran out, then raised and lost the tokens made so far."""
    model = tiny_gpt2()  # n_ctx = 32
    calls = []
    with model.hooks([("hook_embed", lambda x, hook: calls.append(1))]):
        with pytest.raises(ValueError, match=r"the prompt has 30 tokens .* n_ctx=32: max_new_tokens=5 .*at most 2 fit"):
            model.generate(torch.randint(4, 18, (1, 30)), max_new_tokens=5, stop_at_eos=False)
    assert calls == []
    assert model.generate(torch.randint(4, 18, (1, 30)), max_new_tokens=2, stop_at_eos=False).shape == (1, 32)
    # Padding does not count: two real tokens in a row of 31 leave room for 30.
    ids, mask = torch.full((1, 31), 1), torch.zeros(1, 31, dtype=torch.long)
    ids[0, -2:], mask[0, -2:] = torch.tensor([4, 5]), 1
    assert model.generate(ids, attention_mask=mask, max_new_tokens=30, stop_at_eos=False).shape == (1, 61)


@pytest.mark.parametrize("eos", [torch.tensor(3), "<eos>", 3.0, [3, "x"], True])
def test_an_eos_token_id_that_is_not_ids_is_refused(llama, untyped, eos):
    with pytest.raises(ValueError, match="eos_token_id must be an int, a list of ints or None"):
        llama.generate("the cat", max_new_tokens=2, eos_token_id=eos)
