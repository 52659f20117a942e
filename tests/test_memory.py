"""Memory of run_with_cache: the estimate equals what the cache holds, a filter keeps it flat as the
model deepens, a dropped cache is freed at once (no reference cycles, no reference from the model), and
keep_freed_memory lets repeated caches reuse freed pages."""

import gc
import subprocess
import sys
import weakref

import pytest
import torch
from conftest import CASE_IDS, CASES, random_tokens, tiny_hf_model

from hooked_attn import HookedTransformer
from hooked_attn.architectures.llama import tiny_hf_configs as llama_configs
from hooked_attn.cache import storage_nbytes
from hooked_attn.components.kv_cache import KVCache

LONG = 200  # positions: long next to the tiny models' widths, so the pattern [q_pos k_pos] dominates


def llama(n_layers: int = 2) -> HookedTransformer:
    cfg = llama_configs()["gqa"]
    cfg.num_hidden_layers = n_layers
    cfg.max_position_embeddings = LONG
    return HookedTransformer.from_pretrained_no_processing(tiny_hf_model(cfg))


def shapes(cache) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in cache.items()}


@torch.no_grad()
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_estimate_equals_the_cache_of_every_variant(case):
    _, _, hf_cfg = case
    model = HookedTransformer.from_pretrained_no_processing(tiny_hf_model(hf_cfg))
    tokens = random_tokens(hf_cfg, batch=2, n_pos=11)
    estimate = model.cache_memory(tokens)
    _, cache = model.run_with_cache(tokens)
    assert estimate.shapes == shapes(cache)
    assert estimate.nbytes == cache.nbytes


def test_estimate_of_a_long_sequence_with_everything_cached():
    model = llama()
    tokens = torch.randint(0, model.cfg.d_vocab, (1, LONG))
    estimate = model.cache_memory(tokens)
    _, cache = model.run_with_cache(tokens)  # with autograd on, as users run it
    assert estimate.nbytes == cache.nbytes and estimate.shapes == shapes(cache)
    assert estimate.dtypes == {name: t.dtype for name, t in cache.items()}
    # Worked out by hand: each layer's scores and pattern are [batch head q_pos k_pos] floats.
    c = model.cfg
    patterns = 2 * c.n_layers * c.n_heads * LONG * LONG * 4
    assert patterns < cache.nbytes < 2 * patterns
    assert "MiB" in str(estimate)


@torch.no_grad()
def test_estimate_follows_the_cache_options():
    model = llama()
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 40))
    options = {"names_filter": lambda name: name.endswith(("hook_pattern", "hook_resid_post")),
               "dtype": torch.float64, "remove_batch_dim": True}
    estimate = model.cache_memory(tokens, **options)
    _, cache = model.run_with_cache(tokens, **options)
    assert estimate.nbytes == cache.nbytes and estimate.shapes == shapes(cache)
    assert set(estimate.dtypes.values()) == {torch.float64}


@torch.no_grad()
def test_estimate_with_padding_and_a_kv_cache_leaves_the_kv_cache_alone():
    model = llama()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 12))
    mask = torch.ones_like(tokens)
    mask[0, :5] = 0
    kv = KVCache.empty(model.cfg.n_layers)
    model(tokens[:, :4], attention_mask=mask[:, :4], past_kv_cache=kv)
    before = (kv.n_cached, kv.layers[0].k.clone())
    estimate = model.cache_memory(tokens[:, 4:], attention_mask=mask[:, 4:], past_kv_cache=kv)
    assert kv.n_cached == before[0] and torch.equal(kv.layers[0].k, before[1])
    _, cache = model.run_with_cache(tokens[:, 4:], attention_mask=mask[:, 4:], past_kv_cache=kv)
    assert estimate.nbytes == cache.nbytes and estimate.shapes == shapes(cache)
    assert estimate.shapes["blocks.0.attn.hook_pattern"] == (2, model.cfg.n_heads, 8, 12)  # k_pos counts the cache


def test_nbytes_counts_shared_storage_once():
    model = llama()
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 10))
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"])
    one = cache["blocks.0.hook_resid_post"]
    assert cache["blocks.1.hook_resid_pre"].untyped_storage().data_ptr() == one.untyped_storage().data_ptr()
    assert cache.nbytes == one.numel() * one.element_size()
    assert storage_nbytes([one, one[:, :3]]) == storage_nbytes([one])  # a view keeps its whole storage


@torch.no_grad()
def test_a_filter_keeps_the_cache_flat_as_layers_grow():
    tokens = torch.randint(0, 100, (1, 64))
    full, filtered = [], []
    for n_layers in (1, 2, 4):
        model = llama(n_layers)
        _, cache = model.run_with_cache(tokens)
        full.append(cache.nbytes)
        _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")
        filtered.append(cache.nbytes)
        assert model.cache_memory(tokens, names_filter="blocks.0.hook_resid_post").nbytes == filtered[-1]
    assert filtered[0] == filtered[1] == filtered[2] == 64 * 32 * 4  # one [1 64 d_model=32] float32 tensor
    per_layer = full[1] - full[0]
    assert per_layer > 0 and full[2] - full[1] == 2 * per_layer  # everything cached: linear in depth


def _weakref_to_a_cached_tensor(model, tokens, **kwargs):
    logits, cache = model.run_with_cache(tokens, **kwargs)
    return logits, cache, weakref.ref(cache["blocks.1.attn.hook_pattern"]), weakref.ref(cache)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
def test_a_dropped_cache_is_freed_without_the_garbage_collector(grad):
    model = llama()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 16))
    gc.collect()
    gc.disable()  # only reference counting can free it now: a reference cycle would keep it alive
    try:
        with torch.set_grad_enabled(grad):
            logits, cache, tensor_ref, cache_ref = _weakref_to_a_cached_tensor(model, tokens)
        assert tensor_ref() is not None
        del cache
        # The model is alive and still here: it holds no reference to the cache or its tensors.
        assert cache_ref() is None and tensor_ref() is None
        del logits
    finally:
        gc.enable()
    assert model.n_hooks() == 0 and not any(point.ctx for point in model.hook_points())


def test_a_cache_with_gradients_is_freed_once_the_output_is_dropped():
    model = llama()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 16))
    gc.collect()
    gc.disable()
    try:
        logits, cache, tensor_ref, cache_ref = _weakref_to_a_cached_tensor(model, tokens, incl_bwd="deferred")
        logits[:, -1].sum().backward()
        grad_ref = weakref.ref(cache["blocks.1.attn.hook_pattern_grad"])
        del cache, logits
        assert cache_ref() is None and tensor_ref() is None and grad_ref() is None
    finally:
        gc.enable()
    model.zero_grad(set_to_none=True)


_FAULTS_SCRIPT = """
import resource, sys, torch, transformers
from hooked_attn import HookedTransformer, keep_freed_memory
torch.manual_seed(0)
kept = keep_freed_memory(sys.argv[1] == "keep")
cfg = transformers.GPT2Config(n_embd=256, n_layer=4, n_head=4, n_positions=128, vocab_size=512)
model = HookedTransformer.from_pretrained_no_processing(transformers.GPT2LMHeadModel(cfg))
tokens = torch.randint(0, 512, (4, 128))
with torch.no_grad():
    model.run_with_cache(tokens)  # the first call faults its pages in either way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        _, cache = model.run_with_cache(tokens)
        del cache
    print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="keep_freed_memory sets glibc's thresholds")
def test_keep_freed_memory_lets_repeated_caches_reuse_pages(tmp_path):
    # Each run is a fresh process: the setting lasts for the process. A 4x128 cache of this model holds
    # about 60 MiB, so every call faults in ~15k fresh pages unless freed ones are kept.
    script = tmp_path / "faults.py"
    script.write_text(_FAULTS_SCRIPT)

    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, check=True)
        kept, n = out.stdout.split()
        return kept, int(n)

    # The baseline is keep_freed_memory(False): glibc's initial fixed thresholds. glibc's untouched default
    # is no baseline: its adaptive ("dynamic") threshold moves with the allocation history, which thread
    # timing changes, so a default run faults in ~14k pages or none at all (4 runs of 8 here gave 0). With
    # fixed thresholds each dropped cache goes back to the OS and the next call faults in ~62k pages, every run.
    released, releasing = faults("release")
    kept, keeping = faults("keep")
    assert released == kept == "True"
    assert releasing > 10_000, releasing
    assert keeping < releasing / 5, (keeping, releasing)
