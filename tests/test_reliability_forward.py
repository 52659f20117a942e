"""The forward pass under hostile arguments (residual inputs, hooks): a clear error, nothing changed."""

import pytest
import torch

from _reliability import tiny_llama
from conftest import random_tokens, tiny_hf_model
from hooked_attn import HookedTransformer
from hooked_attn.architectures.gemma3 import tiny_hf_configs as gemma3_configs
from hooked_attn.components.kv_cache import KVCache


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int64])
def test_a_residual_of_another_dtype_is_refused_by_name(dtype):
    """It failed deep inside the first block with a bare matmul dtype error."""
    model = tiny_llama()
    resid = torch.randn(2, 3, model.cfg.d_model).to(dtype)
    with pytest.raises(ValueError, match=rf"the residual must have the model's dtype torch.float32, got {dtype}"):
        model(resid, start_at_layer=1)
    assert model.n_hooks() == 0
    torch.testing.assert_close(model(resid.float(), start_at_layer=1),
                               model.run_with_hooks(resid.float(), start_at_layer=1))


def _bidirectional_gemma3():
    cfg = gemma3_configs()["bidirectional"]
    return HookedTransformer.from_pretrained_no_processing(tiny_hf_model(cfg)), cfg


def test_a_kv_cache_on_a_bidirectional_model_is_refused():
    """Cached keys of earlier positions never saw the later tokens: steps differed from the full
    forward by up to 11 in the logits, without a word."""
    model, cfg = _bidirectional_gemma3()
    assert not model.cfg.causal
    cache = KVCache.empty(model.cfg.n_layers)
    with pytest.raises(ValueError, match="past_kv_cache needs causal attention"):
        model(random_tokens(cfg, 2, 4), past_kv_cache=cache)
    assert cache.n_cached == 0 and all(layer.k is None for layer in cache.layers)


def test_generate_on_a_bidirectional_model_runs_the_whole_sequence_each_step():
    model, cfg = _bidirectional_gemma3()
    prompt = random_tokens(cfg, 2, 4)
    cached = model.generate(prompt, max_new_tokens=4, stop_at_eos=False)
    full = model.generate(prompt, max_new_tokens=4, stop_at_eos=False, use_past_kv_cache=False)
    torch.testing.assert_close(cached, full, rtol=0, atol=0)
    tokens = prompt
    for _ in range(4):  # by hand: greedy on the full forward
        tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    torch.testing.assert_close(cached, tokens, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["one position", "no two consecutive real tokens"])
def test_a_loss_over_no_token_is_refused_not_nan(case):
    """The mean over no scored token came back as NaN without a word."""
    model = tiny_llama()
    tokens = torch.tensor([[4, 5, 6, 7], [8, 9, 10, 11]])
    kwargs = ({"input": tokens[:, :1]} if case == "one position"
              else {"input": tokens, "attention_mask": torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]])})
    with pytest.raises(ValueError, match="no token to score"):
        model(return_type="loss", **kwargs)
    assert model(return_type="loss", loss_per_token=True, **kwargs).isfinite().all()
    cache = KVCache.empty(model.cfg.n_layers)
    with pytest.raises(ValueError, match="no token to score"):
        model(tokens[:, :1], return_type="loss", past_kv_cache=cache)
    assert cache.n_cached == 0  # the failed step left the cache as it was


def test_tokens_that_differ_from_the_input_ids_are_refused():
    """tokens= was silently ignored when the input was ids: the loss was taken on the input."""
    model = tiny_llama()
    tokens = torch.tensor([[4, 5, 6, 7], [8, 9, 10, 11]])
    with pytest.raises(ValueError, match="tokens differ from the token ids given as input"):
        model(tokens, return_type="loss", tokens=tokens.flip(1))
    torch.testing.assert_close(model(tokens, return_type="loss", tokens=tokens.clone()), model(tokens, return_type="loss"))
