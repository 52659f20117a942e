"""Inputs that used to give a silent wrong answer or an unclear error now give the right result or a clear
error, before anything runs (issue 18 cases 9 and 10)."""

import json

import pytest
import torch
import transformers

from _reliability import tiny_gpt2, tiny_llama
from conftest import TOL
from hooked_attn import HookedTransformer
from hooked_attn.architectures.base import UnsupportedConfigError


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(4, 18, (2, 6), generator=torch.Generator().manual_seed(0))


def watch(model):
    fired = []
    return fired, model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: fired.append(1))])


@torch.no_grad()
def test_a_generator_names_filter_is_read_once_and_caches_every_name(model, tokens):
    wanted = ["hook_embed", "blocks.1.hook_resid_post"]
    _, cache = model.run_with_cache(tokens, names_filter=(name for name in wanted))
    assert sorted(cache.keys()) == sorted(wanted)


@torch.no_grad()
def test_an_additive_float_mask_is_refused_with_the_fix(model, tokens):
    additive = torch.zeros(2, 6)
    additive[1, :2] = torch.finfo(torch.float32).min
    fired, hooks = watch(model)
    with hooks, pytest.raises(ValueError, match=r"looks like an additive mask \(0 = keep, large negative = "
                                                r"padding\).*attention_mask=\(mask == 0\).long\(\)"):
        model(tokens, attention_mask=additive)
    assert fired == []
    as_01 = (additive == 0).long()
    torch.testing.assert_close(model(tokens, attention_mask=additive.eq(0).float()), model(tokens, attention_mask=as_01),
                               atol=0, rtol=0)  # a float 0/1 mask is read as 1 = real token


@torch.no_grad()
@pytest.mark.parametrize(("mask", "message"), [
    (torch.full((2, 6), 2), r"attention_mask must hold only 0 \(padding\) and 1 \(real token\), got values \[2\]"),
    (torch.tensor([[1] * 6, [0] * 6]), r"attention_mask rows \[1\] have no real token \(all 0\)"),
    (torch.ones(2, 5, dtype=torch.long), r"attention_mask has shape \(2, 5\), but the input is \(2, 6\)"),
])
def test_bad_masks_are_refused(model, tokens, mask, message):
    with pytest.raises(ValueError, match=message):
        model(tokens, attention_mask=mask)


@torch.no_grad()
def test_remove_batch_dim_refuses_a_batch_of_two(model, tokens):
    with pytest.raises(ValueError, match=r"remove_batch_dim=True needs a batch of 1, but hook_embed has shape "
                                         r"\(2, 6, 32\)"):
        model.run_with_cache(tokens, remove_batch_dim=True)
    assert model.n_hooks() == 0
    _, cache = model.run_with_cache(tokens[:1], remove_batch_dim=True)
    assert cache["hook_embed"].shape == (6, 32)


@torch.no_grad()
@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(stop_at_layer=3), r"stop_at_layer must be an int in -2..2 \(the model has 2 layers\), got 3"),
    (dict(stop_at_layer=-3), r"stop_at_layer must be an int in -2..2"),
    (dict(start_at_layer=1, stop_at_layer=1), r"start_at_layer=1, stop_at_layer=1 select no block"),
    (dict(start_at_layer=1, stop_at_layer=-1), r"start_at_layer=1, stop_at_layer=-1 select no block"),
])
def test_layer_ranges_out_of_range_or_empty_are_refused(model, tokens, kwargs, message):
    input = torch.zeros(2, 6, 32) if "start_at_layer" in kwargs else tokens
    with pytest.raises(ValueError, match=message):
        model(input, **kwargs)


@torch.no_grad()
def test_start_at_layer_out_of_range_is_refused(model):
    with pytest.raises(ValueError, match=r"start_at_layer must be an int in -2..2 \(the model has 2 layers\), got 5"):
        model(torch.zeros(1, 3, 32), start_at_layer=5)


@torch.no_grad()
def test_negative_layers_count_from_the_end(model, tokens):
    resid = model(tokens, stop_at_layer=-1)
    torch.testing.assert_close(resid, model(tokens, stop_at_layer=1), atol=0, rtol=0)
    torch.testing.assert_close(model(resid, start_at_layer=-1), model(tokens), **TOL["tiny_fp32"])


@torch.no_grad()
def test_to_tokens_of_prompts_of_different_lengths_masks_its_padding(model):
    prompts = ["the cat sat on a mat", "hi", "dog ran away"]
    ids = model.to_tokens(prompts)  # right padding
    tokens, mask = model.tokenize(prompts)
    torch.testing.assert_close(model(ids), model(tokens, attention_mask=mask), atol=0, rtol=0)
    for row, prompt in enumerate(prompts):
        alone = model(prompt)
        n = alone.shape[1]
        torch.testing.assert_close(model(ids)[row, :n], alone[0], **TOL["tiny_fp32"])
    loss_rows = model(ids, return_type="loss", loss_per_token=True)
    assert (loss_rows[1] == 0).all()  # "hi" is one token: no real next-token pair
    # Equal lengths need no mask and carry none.
    assert not hasattr(model.to_tokens(["the cat", "a dog"]), "hooked_attn_padding_mask")


@torch.no_grad()
@pytest.mark.parametrize(("fwd_hooks", "message"), [
    ({"hook_embed": lambda x, hook: None}, r"fwd_hooks must be a list of \(name, hook\) pairs, got a dict: "
                                          r"pass list\(fwd_hooks.items\(\)\)"),
    (("hook_embed", lambda x, hook: None), r"fwd_hooks must be a list of \(name, hook\) pairs, got one bare pair: "
                                           r"pass \[fwd_hooks\]"),
    ([("hook_embed",)], r"each entry of fwd_hooks must be a \(name, hook function\) pair"),
])
def test_fwd_hooks_of_the_wrong_form_are_named(model, tokens, fwd_hooks, message):
    with pytest.raises(TypeError, match=message):
        model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)
    assert model.n_hooks() == 0


def test_heads_that_do_not_divide_the_width_are_refused(tmp_path):
    hf = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4,
                                                                               vocab_size=20, n_positions=8))
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 30}))  # edited by hand: HF refuses to build it
    with pytest.raises(UnsupportedConfigError, match="hidden size 30 is not divisible by the 4 attention heads"):
        HookedTransformer.from_pretrained(tmp_path)


@torch.no_grad()
def test_return_type_is_checked_before_the_forward(model, tokens):
    from hooked_attn.model import HookedTransformer as HT

    fired, hooks = watch(model)
    with hooks, pytest.raises(ValueError, match="return_type must be 'logits', 'loss', 'both' or None, got 'logit'"):
        HT.forward.__wrapped__(model, tokens, return_type="logit") if hasattr(HT.forward, "__wrapped__") else \
            model._forward_inputs(tokens, "logit", None, None, None, None, None, None, None)
    assert fired == []


@torch.no_grad()
def test_learned_positions_past_n_ctx_leave_a_kv_cache_alone():
    from hooked_attn.components.kv_cache import KVCache

    model = tiny_gpt2()
    cache = KVCache.empty(2)
    model(torch.full((1, 30), 5), past_kv_cache=cache)
    with pytest.raises(ValueError, match=r"position 32 is past the model's n_ctx=32"):
        model(torch.full((1, 3), 5), past_kv_cache=cache)
    assert cache.n_cached == 30
    model(torch.full((1, 2), 5), past_kv_cache=cache)
    assert cache.n_cached == 32


@torch.no_grad()
def test_small_integer_token_dtypes_are_accepted(model, tokens):
    torch.testing.assert_close(model(tokens.to(torch.uint8)), model(tokens), atol=0, rtol=0)


@torch.no_grad()
def test_a_loss_cannot_come_from_a_forward_that_stops_early(model, tokens):
    with pytest.raises(ValueError, match=r"return_type='loss' needs the logits, but stop_at_layer=1 returns"):
        model(tokens, stop_at_layer=1, return_type="loss")


@torch.no_grad()
def test_patching_to_tokens_ids_keeps_their_padding_mask(model):
    from hooked_attn import patching as P

    ids = model.to_tokens(["the cat sat on", "hi"], padding_side="left")  # row 1: three pads, then "hi"
    _, cache = model.run_with_cache(ids)
    alone = model("hi")[0, -1, 4].item()
    assert model(ids)[1, -1, 4].item() == pytest.approx(alone, abs=1e-5)
    result = P.get_act_patch_resid_pre(model, ids, cache, lambda logits: logits[1, -1, 4], progress=False)
    torch.testing.assert_close(result, torch.full_like(result, alone), **TOL["tiny_fp32"])
