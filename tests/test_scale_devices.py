"""The model and what analyses it on separate devices: a cache, an SAE, a clean cache for patching, an
activation store. On a CPU-only machine the second device is ``meta`` (a cache kept there makes every
analysis that mixes a model weight with a cached tensor fail unless it moves the weight) or a second
dtype (the same ``.to(device, dtype)`` plumbing); the GPU variants skip without CUDA."""

import pytest
import torch
import transformers

from hooked_attn import HookedTransformer
from hooked_attn.patching import attribution_patch, generic_activation_patch, layer_pos_patch_setter, path_patch
from hooked_attn.saes import SAE, SAEConfig
from hooked_attn.saes.store import harvest_activations
from tests.conftest import random_tokens, tiny_hf_model

LLAMA = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
GPT2 = transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=101, n_positions=64)
ANALYSES = {
    "accumulated_resid": lambda cache: cache.accumulated_resid(apply_ln=True),
    "decompose_resid": lambda cache: cache.decompose_resid(apply_ln=True),
    "stack_head_results": lambda cache: cache.stack_head_results(apply_ln=True),
    "stack_neuron_results": lambda cache: cache.stack_neuron_results(apply_ln=True),
    "logit_attrs": lambda cache: cache.logit_attrs(cache.decompose_resid(apply_ln=True), 3, incorrect_tokens=5),
}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                    reason=f"needs 2 CUDA devices, this machine has {torch.cuda.device_count()}")


def _sae(d_in: int, hook: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> SAE:
    sae = SAE(SAEConfig(architecture="standard", d_in=d_in, d_sae=4 * d_in, hook_name=hook))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return sae.to(device=device, dtype=dtype)


@pytest.mark.parametrize("hf_cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("processed", [True, False], ids=["processed", "unprocessed"])
def test_cache_analyses_run_on_the_caches_device(hf_cfg, processed):
    hf_model = tiny_hf_model(hf_cfg)
    model = (HookedTransformer.from_pretrained if processed else HookedTransformer.from_pretrained_no_processing)(hf_model)
    tokens = random_tokens(hf_cfg)
    with torch.no_grad():
        _, here = model.run_with_cache(tokens)
        _, elsewhere = model.run_with_cache(tokens, device="meta")
    for name, analysis in ANALYSES.items():
        want, got = analysis(here), analysis(elsewhere)
        assert got.device.type == "meta", name
        assert got.shape == want.shape, name


def test_a_clean_cache_in_another_dtype_patches_as_the_models_own():
    model = HookedTransformer.from_pretrained(tiny_hf_model(LLAMA))
    tokens = random_tokens(LLAMA, batch=2)
    clean, corrupted = tokens[:1], tokens[1:]
    metric = lambda logits: logits[0, -1, 3]  # noqa: E731
    with torch.no_grad():
        _, own = model.run_with_cache(clean)
        _, wide = model.run_with_cache(clean, dtype=torch.float64)  # float32 -> float64 -> float32 is exact
    assert wide["blocks.0.hook_resid_pre"].dtype == torch.float64
    sweep = lambda cache: generic_activation_patch(  # noqa: E731
        model, corrupted, cache, metric, layer_pos_patch_setter, "resid_pre", ["layer", "pos"])
    torch.testing.assert_close(sweep(wide), sweep(own), atol=0, rtol=0)
    with torch.no_grad():
        _, own_new = model.run_with_cache(corrupted, names_filter=lambda n: n.endswith("attn.hook_z"))
        _, wide_new = model.run_with_cache(corrupted, names_filter=lambda n: n.endswith("attn.hook_z"),
                                           dtype=torch.float64)
        _, own_orig = model.run_with_cache(clean)
    path = lambda orig, new: path_patch(model, clean, corrupted, [(0, 1)], ["blocks.2.hook_resid_pre"],  # noqa: E731
                                        metric, orig_cache=orig, new_cache=new)
    assert path(wide, wide_new) == path(own_orig, own_new)


def test_an_sae_in_another_dtype_computes_in_its_own_and_writes_back_in_the_models():
    model = HookedTransformer.from_pretrained(tiny_hf_model(LLAMA))
    hook = "blocks.1.hook_resid_post"
    sae = _sae(LLAMA.hidden_size, hook, dtype=torch.float64)
    tokens = random_tokens(LLAMA)
    seen = []
    with torch.no_grad():
        want = model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda act, hook: sae(act).to(act.dtype))])
        model.add_sae(sae)
        try:
            got = model.run_with_hooks(tokens, fwd_hooks=[(f"{hook}.hook_sae_acts_post",
                                                           lambda act, hook: seen.append(act.dtype))])
        finally:
            model.reset_saes()
    assert seen == [torch.float64] and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("processed", [True, False], ids=["processed", "unprocessed"])
def test_logit_lens_of_a_cpu_cache_of_a_gpu_model(processed):
    hf_model = tiny_hf_model(LLAMA)
    load = HookedTransformer.from_pretrained if processed else HookedTransformer.from_pretrained_no_processing
    on_cpu, on_gpu = load(hf_model), load(hf_model, device="cuda")
    tokens = random_tokens(LLAMA)
    with torch.no_grad():
        _, want = on_cpu.run_with_cache(tokens)
        _, got = on_gpu.run_with_cache(tokens, device="cpu")
    for name, analysis in {**ANALYSES, "logit_lens": lambda cache: cache.logit_lens()}.items():
        result = analysis(got)
        assert result.device.type == "cpu", name
        torch.testing.assert_close(result, analysis(want), atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.gpu
@needs_cuda
def test_a_cpu_clean_cache_patches_a_gpu_model_and_the_store_is_written_from_it(tmp_path):
    hf_model = tiny_hf_model(LLAMA)
    on_cpu, on_gpu = HookedTransformer.from_pretrained(hf_model), HookedTransformer.from_pretrained(hf_model, device="cuda")
    tokens = random_tokens(LLAMA, batch=2)
    metric = lambda logits: logits[0, -1, 3]  # noqa: E731
    with torch.no_grad():
        _, clean_cpu = on_cpu.run_with_cache(tokens[:1])
        _, clean_for_gpu = on_gpu.run_with_cache(tokens[:1], device="cpu")
    want = generic_activation_patch(on_cpu, tokens[1:], clean_cpu, metric, layer_pos_patch_setter, "resid_pre",
                                    ["layer", "pos"])
    got = generic_activation_patch(on_gpu, tokens[1:].cuda(), clean_for_gpu, metric, layer_pos_patch_setter,
                                   "resid_pre", ["layer", "pos"])
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
    from safetensors.torch import load_file

    harvest_activations(on_cpu, tokens, ["blocks.1.hook_resid_post"], tmp_path / "cpu", progress=False)
    harvest_activations(on_gpu, tokens.cuda(), ["blocks.1.hook_resid_post"], tmp_path / "gpu", progress=False)
    for shard in sorted(p.name for p in (tmp_path / "cpu").glob("*.safetensors")):
        cpu, gpu = load_file(tmp_path / "cpu" / shard), load_file(tmp_path / "gpu" / shard)
        for key in cpu:
            torch.testing.assert_close(gpu[key], cpu[key], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@needs_two_gpus
def test_attribution_patching_over_two_gpus_matches_one_device():
    hf_model = tiny_hf_model(LLAMA)
    reference = HookedTransformer.from_pretrained(hf_model)
    model = HookedTransformer.from_pretrained(hf_model, device_map="balanced", max_memory={0: "1GiB", 1: "1GiB"})
    tokens = random_tokens(LLAMA, batch=2)
    metric = lambda logits: logits[:, -1, 3].sum()  # noqa: E731
    want = attribution_patch(reference, tokens[:1], tokens[1:], metric)
    got = attribution_patch(model, tokens[:1], tokens[1:], metric)
    for site in want:
        torch.testing.assert_close(got[site].cpu(), want[site], atol=1e-4, rtol=1e-4, msg=site)
