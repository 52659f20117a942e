"""The library's own checkpoint readers refuse corrupt layouts that would load as wrong weights: overlapping,
shifted or trailing safetensors offsets, a name twice in one header, and a key in two .bin shards
(issue 18 case 6). Each corrupt safetensors file is one the safetensors library refuses too."""

import json
import struct

import pytest
import safetensors
import torch

from hooked_attn.checkpoint import CheckpointError, LazySafetensors, read_torch_bin


def write(path, entries, data: bytes, raw_header: str | None = None):
    header = (raw_header if raw_header is not None else json.dumps(entries)).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


W = {"dtype": "F32", "shape": [4]}
DATA = torch.arange(8, dtype=torch.float32).numpy().tobytes()  # 32 bytes: room for two [4] tensors


@pytest.mark.parametrize(("entries", "data", "message"), [
    ({"weight": {**W, "data_offsets": [0, 16]}, "bias": {**W, "data_offsets": [0, 16]}}, DATA[:16],
     r"tensor '(bias|weight)' starts at data offset 0, expected 16: it overlaps the tensor before it"),
    ({"weight": {**W, "data_offsets": [0, 16]}, "bias": {**W, "data_offsets": [12, 28]}}, DATA[:28],
     r"tensor 'bias' starts at data offset 12, expected 16: it overlaps"),
    ({"weight": {**W, "data_offsets": [0, 16]}, "bias": {**W, "data_offsets": [20, 36]}}, DATA + bytes(4),
     r"tensor 'bias' starts at data offset 20, expected 16: it leaves a gap before it"),
    ({"weight": {**W, "data_offsets": [4, 20]}}, DATA[:20], r"tensor 'weight' starts at data offset 4, expected 0"),
    ({"weight": {**W, "data_offsets": [0, 16]}}, DATA, r"the tensors end at byte .*, but the file has .* bytes"),
    ({"weight": {**W, "data_offsets": [16, 0]}}, DATA, r"'weight' of shape \(4,\) F32 needs 16 bytes"),
    ({"weight": {**W, "data_offsets": [16, 32]}}, DATA[:20], r"truncated \(tensor 'weight' ends"),
])
def test_corrupt_offsets_are_refused_like_the_safetensors_library_does(tmp_path, entries, data, message):
    path = write(tmp_path / "model.safetensors", entries, data)
    with pytest.raises(Exception):  # noqa: B017 - the reference reader refuses the same file
        with safetensors.safe_open(str(path), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(CheckpointError, match=message):
        LazySafetensors([path])


def test_a_name_twice_in_one_header_is_refused(tmp_path):
    raw = ('{"weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
           '"weight": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}')
    path = write(tmp_path / "model.safetensors", None, DATA, raw_header=raw)
    with pytest.raises(CheckpointError, match="its header names tensor 'weight' twice"):
        LazySafetensors([path])


def test_a_good_file_still_reads(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.zeros(0, 2)}
    save_file(tensors, tmp_path / "model.safetensors")
    lazy = LazySafetensors([tmp_path / "model.safetensors"])
    for key, value in tensors.items():
        torch.testing.assert_close(lazy[key], value, atol=0, rtol=0)


def test_a_key_in_two_bin_shards_is_refused(tmp_path):
    torch.save({"weight": torch.ones(2), "bias": torch.zeros(2)}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"weight": torch.full((2,), 5.0)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00002.bin': tensor 'weight' is also in "
                                              r".*pytorch_model-00001-of-00002.bin'"):
        read_torch_bin(tmp_path)


@pytest.mark.parametrize("keep", [0.99, 0.5, 0.05])
def test_a_truncated_gguf_file_is_named(tmp_path, keep):
    import numpy as np
    from gguf import GGUFWriter

    from hooked_attn import HookedTransformer

    path = tmp_path / "model.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"cannot read GGUF file '.*model.gguf' \(\d+ bytes\): it is truncated "
                                              r"or corrupt"):
        HookedTransformer.from_pretrained(path)
