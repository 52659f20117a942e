"""Device maps: which block goes where under a memory budget (planned on the meta device, no GPU
needed), a CPU-only map and a disk map giving the unsharded model's logits, and multi-GPU runs
(skipped, with the reason, where fewer than two CUDA devices exist)."""

import pytest
import torch
import transformers
from accelerate.utils import compute_module_sizes

from hooked_attn import SAE, HookedTransformer, SAEConfig
from hooked_attn.scale import dispatch, load_offloaded, plan_device_map, save_offloaded
from hooked_attn.scale.offload import FolderWeights
from hooked_attn.scale.placement import placement_units
from tests.conftest import random_tokens, tiny_hf_model

LLAMA = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model(LLAMA)


@pytest.fixture(scope="module")
def meta_model(hf_model):
    cfg = HookedTransformer.from_pretrained_no_processing(hf_model).cfg
    with torch.device("meta"):
        return HookedTransformer(cfg)


def _used_per_device(model, plan) -> dict:
    sizes = compute_module_sizes(model)
    used: dict = {}
    for unit, device in plan.items():
        used[device] = used.get(device, 0) + sizes[unit]
    return used


def test_planning_runs_on_meta_and_names_every_unit_whole(meta_model):
    plan = plan_device_map(meta_model, "balanced", max_memory={0: 10**6, 1: 10**6})
    assert list(plan) == placement_units(meta_model)
    assert all(p.device.type == "meta" for p in meta_model.parameters())
    blocks = [plan[f"blocks.{i}"] for i in range(LLAMA.num_hidden_layers)]
    assert blocks == sorted(blocks) and set(blocks) == {0, 1}, plan  # contiguous halves, in order
    assert abs(blocks.count(0) - blocks.count(1)) <= 1, plan


@pytest.mark.parametrize("strategy", ["sequential", "balanced", "auto"])
@pytest.mark.parametrize("gpu_budget", [150_000, 300_000, 450_000])
def test_no_device_exceeds_its_budget(meta_model, strategy, gpu_budget):
    budget = {0: gpu_budget, 1: gpu_budget, "cpu": 150_000, "disk": 10**9}
    plan = plan_device_map(meta_model, strategy, max_memory=budget)
    for device, used in _used_per_device(meta_model, plan).items():
        assert used <= budget[device], (device, used, plan)
    order = {0: 0, 1: 1, "cpu": 2, "disk": 3}  # the forward never goes back to an earlier device
    blocks = [order[plan[f"blocks.{i}"]] for i in range(LLAMA.num_hidden_layers)]
    assert blocks == sorted(blocks), plan


def test_a_budget_too_small_for_one_block_sends_it_to_disk(meta_model):
    plan = plan_device_map(meta_model, "sequential", max_memory={0: 10_000, "cpu": 10_000, "disk": 10**9})
    assert all(plan[f"blocks.{i}"] == "disk" for i in range(LLAMA.num_hidden_layers)), plan


def test_explicit_map_is_checked(meta_model):
    plan = plan_device_map(meta_model, {"": "cpu", "blocks.4": "cuda:1", "blocks.5": torch.device("cuda", 1)})
    assert plan["blocks.3"] == "cpu" and plan["blocks.4"] == 1 and plan["blocks.5"] == 1
    with pytest.raises(ValueError, match="names part of 'blocks.0'"):
        plan_device_map(meta_model, {"": "cpu", "blocks.0.attn": 0})
    with pytest.raises(ValueError, match="names no module"):
        plan_device_map(meta_model, {"": "cpu", "decoder": 0})
    with pytest.raises(ValueError, match="no device to"):
        plan_device_map(meta_model, {"embed": "cpu", "blocks": "cpu"})
    with pytest.raises(ValueError, match="not a strategy"):
        plan_device_map(meta_model, "fastest")
    with pytest.raises(ValueError, match="'meta' holds no weights"):
        plan_device_map(meta_model, {"": "meta"})


def test_bad_device_map_fails_before_the_source_model_is_touched(hf_model):
    before = {k: v.clone() for k, v in hf_model.state_dict().items()}
    with pytest.raises(ValueError, match="on GPU"):
        HookedTransformer.from_pretrained(hf_model, device_map={"": 7}, release_source=True)
    with pytest.raises(ValueError, match="offload_folder"):
        HookedTransformer.from_pretrained(hf_model, device_map={"": "disk"}, release_source=True)
    with pytest.raises(ValueError, match="not both"):
        HookedTransformer.from_pretrained(hf_model, device_map="auto", device="cpu")
    after = hf_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cpu_and_disk_maps_give_the_unsharded_logits_hooks_cache_and_generation(hf_model, tmp_path):
    reference = HookedTransformer.from_pretrained(hf_model)
    tokens = random_tokens(LLAMA, batch=2, n_pos=9)
    with torch.no_grad():
        want, want_cache = reference.run_with_cache(tokens)
    mixed = {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "cpu", "blocks": "disk",
             "ln_final": "cpu", "unembed": "cpu"}
    for device_map in ({"": "cpu"}, "auto", mixed):
        model = HookedTransformer.from_pretrained(hf_model, device_map=device_map, offload_folder=tmp_path / "off")
        assert model.hf_device_map, "accelerate's hooks are attached even when every unit is on the CPU"
        seen = []
        hook = ("blocks.3.attn.hook_z", lambda act, hook: seen.append(act.device))
        with torch.no_grad():
            got, cache = model.run_with_cache(tokens, device="cpu")
            model.run_with_hooks(tokens, fwd_hooks=[hook])
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert set(cache) == set(want_cache)
        for name in want_cache:
            torch.testing.assert_close(cache[name], want_cache[name], atol=0, rtol=0)
        assert seen == [torch.device("cpu")]
        torch.testing.assert_close(model(tokens, return_type="loss"), reference(tokens, return_type="loss"))
        prompt = tokens[:1, :4]
        assert torch.equal(model.generate(prompt, max_new_tokens=4, stop_at_eos=False),
                           reference.generate(prompt, max_new_tokens=4, stop_at_eos=False))
    assert {p.device.type for n, p in model.named_parameters() if n.startswith("blocks.1.")} == {"meta"}
    with pytest.raises(ValueError, match="already dispatched"):
        dispatch(model, {unit: "cpu" for unit in placement_units(model)})


def test_saved_folder_loads_without_processing_again(hf_model, tmp_path):
    reference = HookedTransformer.from_pretrained(hf_model)
    save_offloaded(reference, tmp_path)
    model = load_offloaded(tmp_path)
    assert model.cfg == reference.cfg  # processing recorded, not redone
    tokens = random_tokens(LLAMA)
    params = dict(reference.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), atol=0, rtol=0)
        # Read back in the in-memory layout (W_Q a view of the fused [head d_head d_model] storage).
        weights = FolderWeights(tmp_path, ["blocks.0", "unembed"])
        for name in ("blocks.0.attn.W_Q", "blocks.0.attn.W_O", "unembed.W_U"):
            assert weights[name].stride() == params[name].stride() and torch.equal(weights[name], params[name])
    with pytest.raises(ValueError, match="holds no offloaded model"):
        load_offloaded(tmp_path / "nothing")


needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                    reason=f"needs 2 CUDA devices, this machine has {torch.cuda.device_count()}")


@pytest.mark.gpu
@needs_two_gpus
def test_two_gpu_map_matches_one_device_and_hooks_fire_where_computed(hf_model):
    reference = HookedTransformer.from_pretrained(hf_model)
    model = HookedTransformer.from_pretrained(hf_model, device_map="balanced",
                                              max_memory={0: "1GiB", 1: "1GiB"})
    assert {model.hf_device_map["blocks.0"], model.hf_device_map["blocks.5"]} == {0, 1}
    tokens = random_tokens(LLAMA)
    where = {}

    def record(act, hook):
        where[hook.name] = act.device

    names = lambda n: n.endswith(("hook_resid_post", "hook_pattern"))  # noqa: E731
    with torch.no_grad():
        got, cache = model.run_with_cache(tokens, device="cpu")
        model.run_with_hooks(tokens, fwd_hooks=[(names, record)])
    torch.testing.assert_close(got.cpu(), reference(tokens), atol=1e-4, rtol=1e-4)
    assert {t.device for t in cache.values()} == {torch.device("cpu")}
    for name, device in where.items():
        layer = int(name.split(".")[1])
        assert device == torch.device("cuda", model.hf_device_map[f"blocks.{layer}"]), name
    torch.testing.assert_close(model(tokens, return_type="loss").cpu(), reference(tokens, return_type="loss"),
                               atol=1e-4, rtol=1e-4)
    prompt = tokens[:1, :4]
    assert torch.equal(model.generate(prompt, max_new_tokens=4, stop_at_eos=False).cpu(),
                       reference.generate(prompt, max_new_tokens=4, stop_at_eos=False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_disk_offloaded_model_runs_on_gpu(hf_model, tmp_path):
    reference = HookedTransformer.from_pretrained(hf_model)
    save_offloaded(reference, tmp_path)
    model = load_offloaded(tmp_path, execution_device="cuda:0")
    tokens = random_tokens(LLAMA)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).cpu(), reference(tokens), atol=1e-4, rtol=1e-4)


def _sae(d_in: int, hook: str, device: str = "cpu") -> SAE:
    sae = SAE(SAEConfig(architecture="standard", d_in=d_in, d_sae=4 * d_in, hook_name=hook))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return sae.to(device)


def test_sae_spliced_into_a_dispatched_model(hf_model, tmp_path):
    reference = HookedTransformer.from_pretrained(hf_model)
    mapped = HookedTransformer.from_pretrained(hf_model, device_map={"": "cpu", "blocks.2": "disk"},
                                               offload_folder=tmp_path)
    sae = _sae(LLAMA.hidden_size, "blocks.2.hook_resid_post")
    tokens = random_tokens(LLAMA)
    with torch.no_grad():
        want = reference.run_with_saes(tokens, saes=[sae])
        torch.testing.assert_close(mapped.run_with_saes(tokens, saes=[sae]), want, atol=0, rtol=0)
    assert not torch.equal(want, reference(tokens))  # the SAE changed the output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sae_on_gpu_reads_a_model_on_cpu(hf_model):
    model = HookedTransformer.from_pretrained(hf_model)
    hook = "blocks.1.hook_resid_post"
    tokens = random_tokens(LLAMA)
    with torch.no_grad():
        want = model.run_with_saes(tokens, saes=[_sae(LLAMA.hidden_size, hook)])
        got = model.run_with_saes(tokens, saes=[_sae(LLAMA.hidden_size, hook, "cuda")])
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
