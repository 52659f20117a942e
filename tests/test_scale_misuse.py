"""A dispatched model used the way a user may try: moved or cast as a whole, patched, differentiated, loaded in
another dtype, given odd device maps or a folder of another model. Each either gives the plain model's
answer exactly or refuses by name and stays as it was."""

import tempfile

import pytest
import torch
import transformers

from hooked_attn import HookedTransformer, patching
from hooked_attn.scale import dispatch, load_offloaded, save_offloaded
from hooked_attn.scale.placement import placement_units
from tests.conftest import random_tokens, tiny_hf_model

LLAMA = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=61, max_position_embeddings=32)
MIXED = {"": "disk", "embed": "cpu", "blocks.0": "cpu"}  # blocks 1-2 and the unembedding on disk
TOKENS, OTHER = random_tokens(LLAMA, n_pos=6), random_tokens(LLAMA, n_pos=6, seed=5)


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model(LLAMA)


@pytest.fixture(scope="module")
def reference(hf_model):
    return HookedTransformer.from_pretrained(hf_model)


def offloaded(hf_model, **kwargs):
    return HookedTransformer.from_pretrained(hf_model, device_map=MIXED, offload_folder=tempfile.mkdtemp(), **kwargs)


def metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 3].sum()


def test_a_dispatched_model_refuses_to_be_moved_or_cast_and_stays_as_it_was(hf_model, reference):
    model = offloaded(hf_model)
    before = {name: (p.device, p.dtype) for name, p in model.named_parameters()}
    _, cache = model.run_with_cache(TOKENS)
    moves = {"to float64": lambda: model.to(torch.float64), "half": model.half, "cuda": model.cuda,
             "a block's double": lambda: model.blocks[0].double(), "cache and model": lambda: cache.to("meta", True)}
    for what, move in moves.items():
        with pytest.raises(ValueError, match="spread over devices by a device map"):
            move()
        assert {name: (p.device, p.dtype) for name, p in model.named_parameters()} == before, what
    assert {t.device.type for t in cache.values()} == {"cpu"}
    assert model.to("cpu") is model and model.to(model.device) is model and model.float() is model  # no change
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), reference(TOKENS), atol=0, rtol=0)


def test_patching_and_gradients_on_a_disk_offloaded_model_equal_the_plain_models(hf_model, reference):
    model = offloaded(hf_model)
    _, clean = model.run_with_cache(OTHER)
    _, want_clean = reference.run_with_cache(OTHER)
    torch.testing.assert_close(patching.get_act_patch_attn_head_out_by_pos(model, TOKENS, clean, metric),
                               patching.get_act_patch_attn_head_out_by_pos(reference, TOKENS, want_clean, metric),
                               atol=0, rtol=0)
    got, want = (patching.attribution_patch(m, OTHER, TOKENS, metric) for m in (model, reference))
    for site in want:
        torch.testing.assert_close(got[site], want[site], atol=0, rtol=0, msg=site)
    assert patching.path_patch(model, TOKENS, OTHER, [(0, 1)], [("blocks.2.attn.hook_q", 2)], metric) == \
        patching.path_patch(reference, TOKENS, OTHER, [(0, 1)], [("blocks.2.attn.hook_q", 2)], metric)
    with torch.no_grad():
        for start, stop in ((None, 2), (1, None)):
            x = TOKENS if start is None else reference(TOKENS, stop_at_layer=start)
            torch.testing.assert_close(model(x, start_at_layer=start, stop_at_layer=stop),
                                       reference(x, start_at_layer=start, stop_at_layer=stop), atol=0, rtol=0)
    grads = []
    for m in (model, reference):  # a backward through weights read from disk for the forward only
        _, cache = m.run_with_cache(TOKENS, incl_bwd=True, return_type="loss")
        grads.append({name: t for name, t in cache.items() if name.endswith("_grad")})
    assert grads[1] and set(grads[0]) == set(grads[1])
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=0, rtol=0, msg=name)


def test_another_dtype_loads_onto_a_device_map_as_without_one(hf_model, tmp_path):
    want = HookedTransformer.from_pretrained(hf_model, dtype=torch.bfloat16)
    got = offloaded(hf_model, dtype=torch.bfloat16)
    save_offloaded(want, tmp_path)
    from_folder = load_offloaded(tmp_path)
    assert from_folder.dtype == torch.bfloat16 and {p.dtype for p in from_folder.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        torch.testing.assert_close(got(TOKENS), want(TOKENS), atol=0, rtol=0)
        torch.testing.assert_close(from_folder(TOKENS), want(TOKENS), atol=0, rtol=0)


def test_dispatching_onto_a_folder_of_another_dtype_or_config_is_refused(hf_model, reference, tmp_path):
    save_offloaded(reference, tmp_path)
    all_disk = {unit: "disk" for unit in placement_units(reference)}
    unprocessed_cfg = HookedTransformer.from_pretrained_no_processing(hf_model).cfg
    with torch.device("meta"):
        in_bfloat16 = HookedTransformer(reference.cfg).to(torch.bfloat16)
        unprocessed = HookedTransformer(unprocessed_cfg)
    with pytest.raises(ValueError, match=r"holds embed.W_E as \[61, 32\] float32; the model has .*bfloat16"):
        dispatch(in_bfloat16, all_disk, offload_folder=tmp_path)
    with pytest.raises(ValueError, match="another config"):
        dispatch(unprocessed, {unit: "disk" for unit in placement_units(unprocessed)}, offload_folder=tmp_path)
    assert not hasattr(in_bfloat16, "_hf_hook") and not hasattr(unprocessed, "_hf_hook")


def test_odd_device_maps_are_resolved_or_refused_before_the_source_is_touched(hf_model, reference):
    overlapping = {"": "cpu", "blocks": "disk", "blocks.1": "cpu"}
    model = HookedTransformer.from_pretrained(hf_model, device_map=overlapping, offload_folder=tempfile.mkdtemp())
    assert model.hf_device_map == {"embed": "cpu", "blocks.0": "disk", "blocks.1": "cpu", "blocks.2": "disk",
                                   "unembed": "cpu"}  # the longest key that covers a unit decides
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), reference(TOKENS), atol=0, rtol=0)
    assert HookedTransformer.from_pretrained(hf_model, device_map={"": "cpu:0"}).hf_device_map["blocks.0"] == "cpu"
    source = tiny_hf_model(LLAMA)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    refusals = {"only the blocks": ({"blocks": "cpu"}, "no device to 4 weights"),
                "a device this machine lacks": ({"": "cpu", "blocks.2": "mps"}, r"on 'mps', which this machine cannot use"),
                "a block past the last": ({"": "cpu", "blocks.3": "cpu"}, "'blocks.3' names no module"),
                "a hook inside a block": ({"": "cpu", "blocks.0.hook_resid_pre": "cpu"}, "names part of 'blocks.0'")}
    for what, (device_map, match) in refusals.items():
        if what == "a device this machine lacks" and torch.backends.mps.is_available():
            continue
        with pytest.raises(ValueError, match=match):
            HookedTransformer.from_pretrained(source, device_map=device_map, release_source=True)
    with pytest.raises(ValueError, match=r"max_memory\['cpu'\] = -5"):  # was: everything sent to disk
        HookedTransformer.from_pretrained(source, device_map="auto", max_memory={"cpu": -5, "disk": "1GB"},
                                          offload_folder=tempfile.mkdtemp(), release_source=True)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("causal", [True, False])
def test_a_context_copied_to_another_device_keeps_every_field(causal):
    """Each block's device gets its own copy of the forward's AttentionContext; a field left out of the
    copy (a bidirectional model's ``causal=False``) would silently change that block's mask."""
    from hooked_attn.components.attention import AttentionContext
    from hooked_attn.scale.dispatch import _ContextMover

    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    ctx = AttentionContext.build(2, 4, torch.device("cpu"), mask, causal=causal)
    ctx.query_key_pos = torch.randn(2, 4, 8)
    ctx.rope_cache["cpu table"] = torch.zeros(1)  # per-device tables are rebuilt, not shared
    copy = _ContextMover().on(ctx, torch.device("meta"))
    assert copy is not ctx and copy.causal is causal and copy.kv_cache is ctx.kv_cache
    assert copy.rope_cache == {} and copy.masks == {}
    for name in ("attend", "positions", "key_positions", "query_key_pos"):
        moved, source = getattr(copy, name), getattr(ctx, name)
        assert moved.device.type == "meta" and moved.shape == source.shape and moved.dtype == source.dtype, name
