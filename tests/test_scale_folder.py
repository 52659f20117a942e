"""Offload folders written over (hooked_attn.scale.folder): a folder holds one model and never a silent mix of
two; files hooked_attn did not write are never removed or overwritten; an interrupted write and a file that
does not match the manifest are refused."""

import json
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

from hooked_attn import HookedTransformer
from hooked_attn.scale import load_offloaded, save_offloaded
from hooked_attn.scale.folder import MANIFEST, OffloadFolderError
from tests.conftest import random_tokens, tiny_hf_model


def llama(n_layers: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=61,
                                    max_position_embeddings=32)


TOKENS = random_tokens(llama(1), n_pos=6)
ALL_DISK = {"": "disk"}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_a_smaller_model_written_over_a_larger_one_replaces_it_and_leaves_other_files_alone(tmp_path):
    larger, smaller = tiny_hf_model(llama(4), seed=0), tiny_hf_model(llama(2), seed=1)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "blocks.9.safetensors").write_bytes(b"not hooked_attn's")  # never listed: never touched
    HookedTransformer.from_pretrained(larger, device_map=ALL_DISK, offload_folder=tmp_path)
    assert {"blocks.3.safetensors", "notes.txt", "blocks.9.safetensors"} <= files(tmp_path)
    HookedTransformer.from_pretrained(smaller, device_map=ALL_DISK, offload_folder=tmp_path)
    assert files(tmp_path) == {MANIFEST, "embed.safetensors", "blocks.0.safetensors", "blocks.1.safetensors",
                               "unembed.safetensors", "notes.txt", "blocks.9.safetensors"}
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "blocks.9.safetensors").read_bytes() == b"not hooked_attn's"
    torch.testing.assert_close(logits(load_offloaded(tmp_path)), logits(HookedTransformer.from_pretrained(smaller)),
                               atol=0, rtol=0)


def test_another_models_folder_written_with_a_cpu_mix_is_never_loaded_as_a_mix(tmp_path):
    first, second = tiny_hf_model(llama(3), seed=0), tiny_hf_model(llama(3), seed=2)  # same shapes
    HookedTransformer.from_pretrained(first, device_map=ALL_DISK, offload_folder=tmp_path)
    mixed = HookedTransformer.from_pretrained(second, device_map={"": "disk", "embed": "cpu", "blocks.0": "cpu"},
                                              offload_folder=tmp_path)
    torch.testing.assert_close(logits(mixed), logits(HookedTransformer.from_pretrained(second)), atol=0, rtol=0)
    # The first model's embed and blocks.0 (which the second keeps in memory) are gone, not left to be read.
    assert files(tmp_path) == {MANIFEST, "blocks.1.safetensors", "blocks.2.safetensors", "unembed.safetensors"}
    with pytest.raises(ValueError, match=r"does not hold the weights of \['embed', 'blocks.0'\]"):
        load_offloaded(tmp_path)


def test_files_of_someone_else_in_the_way_are_refused_before_the_source_is_touched(tmp_path):
    hf_model = tiny_hf_model(llama(2))
    before = {k: v.clone() for k, v in hf_model.state_dict().items()}
    (tmp_path / "blocks.1.safetensors").write_bytes(b"someone else's")
    with pytest.raises(OffloadFolderError, match=r"holds \['blocks.1.safetensors'\], which hooked_attn did not write"):
        HookedTransformer.from_pretrained(hf_model, device_map=ALL_DISK, offload_folder=tmp_path, release_source=True)
    with pytest.raises(OffloadFolderError, match="did not write"):
        save_offloaded(HookedTransformer.from_pretrained(hf_model), tmp_path)
    assert files(tmp_path) == {"blocks.1.safetensors"}
    assert (tmp_path / "blocks.1.safetensors").read_bytes() == b"someone else's"
    for key, value in hf_model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0, msg=key)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(OffloadFolderError, match="cannot be read"):
        HookedTransformer.from_pretrained(hf_model, device_map=ALL_DISK, offload_folder=tmp_path)


@pytest.mark.parametrize("where", ["a file", "inside a file"])
def test_an_offload_folder_that_cannot_be_a_folder_is_refused_before_the_source_is_touched(tmp_path, where):
    hf_model = tiny_hf_model(llama(2))
    before = {k: v.clone() for k, v in hf_model.state_dict().items()}
    (tmp_path / "file").write_text("x")
    folder = tmp_path / "file" if where == "a file" else tmp_path / "file" / "offload"
    match = "is a file, not a folder" if where == "a file" else "cannot be written"
    with pytest.raises(OffloadFolderError, match=match):
        HookedTransformer.from_pretrained(hf_model, device_map=ALL_DISK, offload_folder=folder, release_source=True)
    assert (tmp_path / "file").read_text() == "x"
    for key, value in hf_model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0, msg=key)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 555 folder; 'inside a file' covers the path")
def test_a_read_only_offload_folder_is_refused(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OffloadFolderError, match="cannot be written"):
            HookedTransformer.from_pretrained(tiny_hf_model(llama(2)), device_map=ALL_DISK, offload_folder=folder)
        assert files(folder) == set()
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("when", ["in the third file", "while removing the earlier model's files"])
def test_an_interrupted_write_is_refused_and_writing_again_repairs_it(tmp_path, monkeypatch, when):
    first, second = tiny_hf_model(llama(4), seed=0), tiny_hf_model(llama(3), seed=2)
    HookedTransformer.from_pretrained(first, device_map=ALL_DISK, offload_folder=tmp_path)
    running = load_offloaded(tmp_path)
    save, unlink, calls = safetensors.torch.save_file, Path.unlink, []

    def crash_in_the_third_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:  # half a file written, then the process "dies"
            Path(path).write_bytes(Path(path).read_bytes()[:100])
            raise KeyboardInterrupt
        save(tensors, path, metadata=metadata)

    def crash_removing_blocks_3(path, missing_ok=False):
        if path.name == "blocks.3.safetensors":
            raise KeyboardInterrupt
        unlink(path, missing_ok=missing_ok)

    if when == "in the third file":
        monkeypatch.setattr(safetensors.torch, "save_file", crash_in_the_third_file)
    else:
        monkeypatch.setattr(Path, "unlink", crash_removing_blocks_3)
    with pytest.raises(KeyboardInterrupt):
        HookedTransformer.from_pretrained(second, device_map=ALL_DISK, offload_folder=tmp_path)
    monkeypatch.undo()
    with pytest.raises(OffloadFolderError, match="interrupted"):
        load_offloaded(tmp_path)
    with pytest.raises(OffloadFolderError, match="written over after this model was loaded"):
        logits(running)  # its embedding file now holds the second model's
    HookedTransformer.from_pretrained(second, device_map=ALL_DISK, offload_folder=tmp_path)
    assert "blocks.3.safetensors" not in files(tmp_path)  # the first model's, known from the pending manifest
    torch.testing.assert_close(logits(load_offloaded(tmp_path)), logits(HookedTransformer.from_pretrained(second)),
                               atol=0, rtol=0)


def test_a_file_that_does_not_match_the_manifest_is_refused(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, seed in ((first, 0), (second, 2)):  # two models of the same shapes
        HookedTransformer.from_pretrained(tiny_hf_model(llama(3), seed=seed), device_map=ALL_DISK, offload_folder=folder)
    load_offloaded(first)
    shutil.copy(second / "blocks.1.safetensors", first / "blocks.1.safetensors")
    with pytest.raises(OffloadFolderError, match="blocks.1.safetensors' was not written with the folder's manifest"):
        load_offloaded(first)
    (first / "blocks.1.safetensors").unlink()
    with pytest.raises(OffloadFolderError, match="blocks.1.safetensors' cannot be read"):
        load_offloaded(first)
    manifest = json.loads((second / MANIFEST).read_text())
    (second / MANIFEST).write_text(json.dumps({k: v for k, v in manifest.items() if k not in ("format", "write_id")}))
    with pytest.raises(OffloadFolderError, match="older hooked_attn"):
        load_offloaded(second)


def test_the_tokenizer_in_a_folder_is_the_written_models_own(tmp_path):
    from hooked_attn.default_model import gpt2_tokenizer

    hf_cfg = llama(1)
    hf_cfg.vocab_size = 50257  # the tokenizer's
    with_tokenizer = HookedTransformer.from_pretrained(tiny_hf_model(hf_cfg), tokenizer=gpt2_tokenizer())
    save_offloaded(with_tokenizer, tmp_path)
    assert load_offloaded(tmp_path).tokenizer is not None
    save_offloaded(HookedTransformer.from_pretrained(tiny_hf_model(hf_cfg)), tmp_path)  # no tokenizer
    assert "tokenizer" not in files(tmp_path) and load_offloaded(tmp_path).tokenizer is None
    (tmp_path / "tokenizer").mkdir()  # someone else's
    with pytest.raises(OffloadFolderError, match=r"holds \['tokenizer'\]"):
        save_offloaded(with_tokenizer, tmp_path)
