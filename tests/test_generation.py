"""Generation: the KV cache changes nothing, batches with left padding equal single prompts, hooks
fire on every step, and greedy output equals HF generate token for token on real weights."""

import pytest
import torch
import transformers

from conftest import tiny_hf_model
from hooked_attn import HookedTransformer
from hooked_attn.architectures.gpt2 import tiny_hf_configs as gpt2_configs
from hooked_attn.architectures.llama import tiny_hf_configs as llama_configs
from hooked_attn.components.kv_cache import KVCache
from hooked_attn.default_model import prepare_smollm2


@pytest.fixture(params=["gpt2", "llama"])
def tiny(request):
    cfg = gpt2_configs()["default"] if request.param == "gpt2" else llama_configs()["gqa"]
    hf = tiny_hf_model(cfg)
    return HookedTransformer.from_pretrained_no_processing(hf), hf, cfg


@torch.no_grad()
def test_kv_cache_forward_equals_full_forward(tiny):
    model, _, cfg = tiny
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    cache = KVCache.empty(model.cfg.n_layers)
    parts = [model(tokens[:, :5], past_kv_cache=cache), model(tokens[:, 5:9], past_kv_cache=cache)]
    parts += [model(tokens[:, i:i + 1], past_kv_cache=cache) for i in range(9, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.n_cached == 12 and cache.layers[0].k.shape[1] == 12


@torch.no_grad()
def test_kv_cache_with_left_padding(tiny):
    model, _, cfg = tiny
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8), generator=gen)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    full = model(tokens, attention_mask=mask)
    cache = KVCache.empty(model.cfg.n_layers)
    first = model(tokens[:, :6], attention_mask=mask[:, :6], past_kv_cache=cache)
    rest = model(tokens[:, 6:], past_kv_cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], 1)[mask.bool()], full[mask.bool()], atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_hf_generate(tiny, use_cache):
    model, hf, cfg = tiny
    prompt = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    ours = model.generate(prompt, max_new_tokens=8, use_past_kv_cache=use_cache, stop_at_eos=False)
    ref = hf.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8, pad_token_id=0)
    assert torch.equal(ours, ref)


@torch.no_grad()
def test_sampling_is_reproducible_and_respects_top_k(tiny):
    model, _, cfg = tiny
    prompt = torch.randint(0, cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(3))
    runs = [model.generate(prompt, max_new_tokens=6, do_sample=True, top_k=1, stop_at_eos=False,
                           generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    greedy = model.generate(prompt, max_new_tokens=6, stop_at_eos=False)
    assert torch.equal(runs[0], greedy)  # top_k=1 leaves only the argmax
    hot = model.generate(prompt, max_new_tokens=6, do_sample=True, top_p=0.9, temperature=2.0, stop_at_eos=False,
                         generator=torch.Generator().manual_seed(7))
    assert hot.shape == (1, 10)


@torch.no_grad()
def test_hooks_fire_on_every_step_and_steer(tiny):
    model, _, cfg = tiny
    prompt = torch.randint(0, cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(4))
    calls = []
    plain = model.generate(prompt, max_new_tokens=5, stop_at_eos=False)
    steer = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(5)) * 20

    def add(resid, hook):
        calls.append(resid.shape[1])
        return resid + steer

    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", add)]):
        steered = model.generate(prompt, max_new_tokens=5, stop_at_eos=False)
    assert calls == [4, 1, 1, 1, 1]  # the prompt, then one new position per step
    assert not torch.equal(plain, steered)
    assert model.n_hooks() == 0


@torch.no_grad()
def test_return_cache_covers_the_whole_sequence(tiny):
    model, _, cfg = tiny
    prompt = torch.randint(0, cfg.vocab_size, (1, 4), generator=torch.Generator().manual_seed(6))
    tokens, cache = model.generate(prompt, max_new_tokens=3, stop_at_eos=False, return_cache=True)
    assert tokens.shape == (1, 7) and cache["resid_pre", 0].shape[:2] == (1, 7)


@pytest.mark.real_weights
@torch.no_grad()
def test_greedy_smollm2_equals_hf_generate_with_and_without_cache():
    folder = prepare_smollm2()
    model = HookedTransformer.from_pretrained(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompts = ["The capital of France is", "Here is a short poem about the sea:", "def add(a, b):"]
    for use_cache in (True, False):
        ours = model.generate(prompts, max_new_tokens=12, use_past_kv_cache=use_cache, return_type="tokens")
        tokens, mask = model.tokenize(prompts, padding_side="left")
        ref = hf.generate(tokens, attention_mask=mask, max_new_tokens=12, do_sample=False,
                          pad_token_id=model.tokenizer.eos_token_id)
        assert torch.equal(ours[:, tokens.shape[1]:], ref[:, tokens.shape[1]:]), use_cache
    text = model.generate("The capital of France is", max_new_tokens=3)
    assert text.startswith("The capital of France is Paris")
