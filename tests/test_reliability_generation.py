"""generate(): right-padded rows continue from their last real token, sampling options are checked
before anything runs, and the signature is real (issue 18 cases 1 and 9, issue 17's generation mixin)."""

import inspect

import pytest
import torch

from _reliability import tiny_llama
from hooked_attn.generation import GenerationMixin

PROMPTS = ["the cat sat on a", "hi", "dog ran"]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def alone(model, prompt, n=5):
    return model.generate(prompt, max_new_tokens=n, stop_at_eos=False)


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [True, False])
def test_right_padded_rows_continue_from_their_last_real_token(model, use_cache):
    tokens, mask = model.tokenize(PROMPTS)  # right padding, the default
    assert mask[1].tolist() == [1, 0, 0, 0, 0]
    out = model.generate(tokens, attention_mask=mask, max_new_tokens=5, stop_at_eos=False,
                         use_past_kv_cache=use_cache, return_type="str")
    assert out == [alone(model, p) for p in PROMPTS]
    ids = model.generate(tokens, attention_mask=mask, max_new_tokens=5, stop_at_eos=False, use_past_kv_cache=use_cache)
    for row, prompt in zip(ids, PROMPTS):  # returned left-padded: each row ends with its continuation
        single = model.generate(model.to_tokens(prompt), max_new_tokens=5, stop_at_eos=False)[0]
        assert torch.equal(row[-len(single):], single)


@torch.no_grad()
def test_mask_with_holes_is_packed_and_matches_the_real_tokens_alone(model):
    tokens, mask = model.tokenize(["the cat sat on a"])
    mask[0, 2] = 0  # drop "cat" from the middle
    packed = model.generate(tokens, attention_mask=mask, max_new_tokens=4, stop_at_eos=False)
    compact = model.generate(tokens[:, mask[0].bool()], max_new_tokens=4, stop_at_eos=False)
    assert torch.equal(packed[:, 1:], compact)  # one padding position first, then the same ids


@torch.no_grad()
def test_to_tokens_padding_is_not_generated_from(model):
    ids = model.to_tokens(PROMPTS)  # right-padded ids that carry their mask
    out = model.generate(ids, max_new_tokens=5, stop_at_eos=False, return_type="str")
    assert out == [alone(model, p) for p in PROMPTS]


@torch.no_grad()
def test_a_row_without_real_tokens_is_refused(model):
    tokens, mask = model.tokenize(PROMPTS)
    mask[2] = 0
    with pytest.raises(ValueError, match=r"attention_mask rows \[2\] have no real token"):
        model.generate(tokens, attention_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize(("options", "message"), [
    (dict(temperature=0.7), r"temperature=0.7 only apply when sampling: pass do_sample=True"),
    (dict(top_k=5), r"top_k=5 only apply when sampling"),
    (dict(top_p=0.9, temperature=2.0), r"temperature=2.0, top_p=0.9 only apply when sampling"),
    (dict(do_sample=True, temperature=-1.0), r"temperature must be >= 0 \(0 means greedy\), got -1.0"),
    (dict(do_sample=True, temperature=float("nan")), r"temperature must be a number >= 0, got nan"),
    (dict(do_sample=True, top_k=0), r"top_k must be an int >= 1 \(1 is greedy\) or None, got 0"),
    (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\] or None, got 0.0"),
    (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\] or None, got 1.5"),
    (dict(max_new_tokens=-1), r"max_new_tokens must be an int >= 0, got -1"),
    (dict(eos_token_id=1000), r"eos_token_id \[1000\] is outside the vocabulary 0..17"),
])
def test_sampling_options_are_checked_before_anything_runs(model, options, message):
    fired = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: fired.append(1))]):
        with pytest.raises(ValueError, match=message):
            model.generate("the cat", **options)
    assert fired == []


@torch.no_grad()
def test_temperature_zero_with_sampling_is_greedy(model):
    sampled = model.generate("the cat", max_new_tokens=4, do_sample=True, temperature=0.0, stop_at_eos=False,
                             generator=torch.Generator().manual_seed(0))
    assert sampled == alone(model, "the cat", 4)


def test_generate_has_a_real_signature_on_the_mixin(model):
    params = inspect.signature(type(model).generate).parameters
    assert isinstance(model, GenerationMixin)
    for name in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "stop_at_eos", "eos_token_id",
                 "use_past_kv_cache", "attention_mask", "return_type", "return_cache", "generator"):
        assert name in params, name
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
