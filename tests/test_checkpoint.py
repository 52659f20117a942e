"""The lazy safetensors reader and the loader's no-second-copy rule: tensors read on demand, equal to what
safetensors itself reads; corrupt files refused with the file and tensor named; an in-memory HF model's
weights copied (never shared), a folder's adopted without another copy."""

import json
import struct

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from hooked_attn import HookedTransformer
from hooked_attn.checkpoint import CheckpointError, LazySafetensors
from tests.conftest import TOL, random_tokens, tiny_hf_model

LLAMA = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=101, max_position_embeddings=32)


@pytest.fixture
def saved(tmp_path):
    model = tiny_hf_model(LLAMA)
    model.save_pretrained(tmp_path)
    return tmp_path, model


def test_lazy_reader_returns_what_safetensors_reads_in_any_dtype(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "ids": torch.arange(6),
               "empty": torch.zeros(0, 3)}
    save_file(tensors, tmp_path / "x.safetensors")
    lazy = LazySafetensors([tmp_path / "x.safetensors"])
    assert set(lazy) == set(tensors) and len(lazy) == 4 and "a" in lazy and "zzz" not in lazy
    reference = load_file(tmp_path / "x.safetensors")
    for key, tensor in reference.items():
        torch.testing.assert_close(lazy[key], tensor, rtol=0, atol=0)
    as_f64 = LazySafetensors([tmp_path / "x.safetensors"], dtype=torch.float64)
    assert as_f64["a"].dtype == torch.float64 and as_f64["ids"].dtype == torch.int64  # only floats convert
    first, second = lazy["a"], lazy["a"]
    assert first.data_ptr() != second.data_ptr()  # every access is a fresh tensor that nobody else holds


def test_corrupt_headers_and_short_files_are_refused_naming_the_file_and_tensor(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"weight": torch.randn(16, 16)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated.*'weight'"):
        LazySafetensors([path])
    path.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="shorter than a header"):
        LazySafetensors([path])
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(CheckpointError, match="header claims"):
        LazySafetensors([path])
    header = json.dumps({"weight": {"dtype": "F32", "shape": [16, 16], "data_offsets": [0, 12]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(12))
    with pytest.raises(CheckpointError, match="'weight' of shape"):
        LazySafetensors([path])
    header = json.dumps({"weight": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(1))
    with pytest.raises(CheckpointError, match="bad header entry for 'weight'"):
        LazySafetensors([path])


def test_a_folder_loads_equal_to_hf_without_keeping_a_second_copy(saved):
    folder, hf = saved
    model = HookedTransformer.from_pretrained_no_processing(folder)
    tokens = random_tokens(LLAMA)
    torch.testing.assert_close(model(tokens), hf(tokens).logits, **TOL["tiny_fp32"])
    # Every parameter owns its storage outright: nothing else (a converted copy, a file map) sits behind it.
    for name, p in model.named_parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), name
        assert p.device.type == "cpu" and not p.is_meta


def test_bf16_folder_load_reads_into_bf16(saved):
    folder, hf = saved
    model = HookedTransformer.from_pretrained_no_processing(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(model.W_E, hf.model.embed_tokens.weight.to(torch.bfloat16), rtol=0, atol=0)


def test_an_in_memory_model_is_copied_never_shared(saved):
    _, hf = saved
    model = HookedTransformer.from_pretrained_no_processing(hf)
    hf_storage = {p.untyped_storage().data_ptr() for p in hf.parameters()}
    assert not {p.untyped_storage().data_ptr() for p in model.parameters()} & hf_storage
    before = hf.model.embed_tokens.weight.clone()
    with torch.no_grad():
        model.W_E.add_(1.0)
    torch.testing.assert_close(hf.model.embed_tokens.weight, before, rtol=0, atol=0)


def test_parameters_keep_the_layout_the_forward_pass_expects(saved):
    folder, _ = saved
    loaded = HookedTransformer.from_pretrained(folder)
    with torch.device("meta"):
        fresh = HookedTransformer(loaded.cfg)
    for (name, p), (_, q) in zip(loaded.named_parameters(), fresh.named_parameters()):
        assert p.stride() == q.stride(), name  # W_Q is a view of [head d_head d_model] storage, etc.


def test_a_checkpoint_saved_from_the_base_model_loads_under_the_task_prefix(tmp_path):
    """bloom-560m on the hub stores ``word_embeddings.weight``, ``h.0...`` (a BloomModel) under
    architectures=["BloomForCausalLM"]; HF adds the ``transformer.`` prefix, and so do we."""
    bloom = transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=101)
    hf = tiny_hf_model(bloom)
    hf.save_pretrained(tmp_path)
    keys = {k.removeprefix("transformer."): v.contiguous() for k, v in load_file(tmp_path / "model.safetensors").items()
            if k != "lm_head.weight"}
    assert not any(k.startswith("transformer.") for k in keys)
    save_file(keys, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = HookedTransformer.from_pretrained_no_processing(tmp_path)
    tokens = random_tokens(bloom)
    torch.testing.assert_close(model(tokens), hf(tokens).logits, **TOL["tiny_fp32"])
    # And a base checkpoint that leaves out a key the task model needs is still refused by name.
    del keys["ln_f.bias"]
    save_file(keys, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match="ln_f.bias"):
        HookedTransformer.from_pretrained_no_processing(tmp_path)


def test_converting_reads_go_through_a_bounded_buffer_and_equal_a_plain_cast(tmp_path, monkeypatch):
    import hooked_attn.checkpoint as checkpoint

    tensors = {"big": torch.randn(37, 29), "ids": torch.arange(11)}
    save_file(tensors, tmp_path / "x.safetensors")
    monkeypatch.setattr(checkpoint, "_CHUNK_ELEMENTS", 10)  # many partial reads, the last one short
    lazy = LazySafetensors([tmp_path / "x.safetensors"], dtype=torch.bfloat16)
    torch.testing.assert_close(lazy["big"], tensors["big"].to(torch.bfloat16), rtol=0, atol=0)
    assert lazy["ids"].dtype == torch.int64
