"""Tokenizer helpers, driven by the real GPT-2 tokenizer, and padded batches."""

import pytest
import torch

from conftest import tiny_hf_model
from hooked_attn import HookedTransformer
from hooked_attn.architectures.gpt2 import tiny_hf_configs as gpt2_configs
from hooked_attn.architectures.llama import tiny_hf_configs as llama_configs
from hooked_attn.default_model import gpt2_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    cfg = gpt2_configs()["default"]
    cfg.vocab_size = len(tokenizer)
    cfg.bos_token_id = cfg.eos_token_id = tokenizer.eos_token_id
    return HookedTransformer.from_pretrained_no_processing(tiny_hf_model(cfg), tokenizer=tokenizer)


def test_to_tokens_and_back(gpt2):
    assert gpt2.to_tokens("Hello world").tolist() == [[15496, 995]]
    assert gpt2.to_tokens("Hello world", prepend_bos=True).tolist() == [[50256, 15496, 995]]
    assert gpt2.to_str_tokens("Hello world") == ["Hello", " world"]
    assert gpt2.to_str_tokens(["Hi", "Hello world"]) == [["Hi"], ["Hello", " world"]]
    assert gpt2.to_string(torch.tensor([15496, 995])) == "Hello world"
    assert gpt2.to_string(torch.tensor([[15496, 995]])) == ["Hello world"]
    assert gpt2.to_single_token(" world") == 995
    with pytest.raises(ValueError, match="not a single token.*'Hello', ' world'"):
        gpt2.to_single_token("Hello world")
    assert gpt2.get_token_position(" world", "Hello world world") == 1
    assert gpt2.get_token_position(" world", "Hello world world", mode="last") == 2
    with pytest.raises(ValueError, match="does not occur"):
        gpt2.get_token_position(" cat", "Hello world")


def test_lists_of_strings_are_padded_right_by_default_and_left_on_request(gpt2):
    tokens = gpt2.to_tokens(["Hello world", "Hi"])
    pad = gpt2.tokenizer.eos_token_id
    assert tokens.tolist() == [[15496, 995], [17250, pad]]
    assert gpt2.to_tokens(["Hello world", "Hi"], padding_side="left").tolist() == [[15496, 995], [pad, 17250]]


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_each_sequence_alone(gpt2, side):
    texts = ["The cat sat on the mat", "Hi there", "A"]
    logits = gpt2(texts, padding_side=side)
    for i, text in enumerate(texts):
        alone = gpt2(text)[0]
        n = alone.shape[0]
        rows = logits[i, -n:] if side == "left" else logits[i, :n]
        torch.testing.assert_close(rows, alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_llama_padding_shifts_rotary_positions(side):
    cfg = llama_configs()["gqa"]
    model = HookedTransformer.from_pretrained_no_processing(tiny_hf_model(cfg))
    seqs = [torch.randint(0, cfg.vocab_size, (n,)) for n in (7, 3)]
    tokens = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(7 - len(s), 7) if side == "left" else slice(0, len(s))
        tokens[i, span], mask[i, span] = s, 1
    logits, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: n.endswith("pattern"))
    for i, s in enumerate(seqs):
        alone = model(s[None])[0]
        span = slice(7 - len(s), 7) if side == "left" else slice(0, len(s))
        torch.testing.assert_close(logits[i, span], alone, atol=1e-5, rtol=1e-5)
        pattern = cache["pattern", 0][i][:, span]  # real queries
        assert torch.all(pattern[..., ~mask[i].bool()] == 0)  # never attend to padding


@torch.no_grad()
def test_loss_skips_padding(gpt2):
    texts = ["The cat sat on the mat", "Hi there"]
    batch_loss = gpt2(texts, return_type="loss", loss_per_token=True)
    alone = gpt2(texts[1], return_type="loss", loss_per_token=True)
    torch.testing.assert_close(batch_loss[1, : alone.shape[1]], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.all(batch_loss[1, alone.shape[1]:] == 0)
    logits, loss = gpt2(texts[0], return_type="both")
    assert loss.ndim == 0 and logits.shape[-1] == gpt2.cfg.d_vocab


@torch.no_grad()
def test_tokenize_returns_the_mask_that_makes_padding_invisible(gpt2):
    tokens, mask = gpt2.tokenize(["The cat sat", "Hi"], padding_side="left")
    assert mask.tolist()[1][0] == 0 and mask.sum().item() == 4
    logits = gpt2(tokens, attention_mask=mask)
    torch.testing.assert_close(logits[1, -1], gpt2("Hi")[0, -1], atol=1e-5, rtol=1e-5)
