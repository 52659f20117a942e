"""Reading weights from a model whose units a device map keeps on disk: the stacked views (model.W_Q, ...,
W_E, W_U, W_pos, QK, OV) read those units from the offload folder and equal the plain-loaded model's
exactly; per block, ``weights_loaded`` does the same; a model with no weights at all is refused by name."""

import tempfile

import pytest
import torch
import transformers

from hooked_attn import HookedTransformer
from hooked_attn.scale import load_offloaded, save_offloaded, weights_loaded
from tests.conftest import tiny_hf_model

LLAMA = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=61, max_position_embeddings=32)
GPT2 = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=61, n_positions=16)
VIEWS = ["W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_out", "b_in", "b_out", "W_E", "W_U", "b_U"]
MAPS = {"all on disk": {"": "disk"}, "mixed": {"": "disk", "embed": "cpu", "blocks.0": "cpu"}}


@pytest.mark.parametrize(("hf_cfg", "extra"), [(LLAMA, ["W_gate", "b_gate"]), (GPT2, ["W_pos"])], ids=["llama", "gpt2"])
@pytest.mark.parametrize("device_map", MAPS.values(), ids=MAPS.keys())
def test_stacked_views_of_a_disk_offloaded_model_equal_the_plain_models(hf_cfg, extra, device_map):
    hf_model = tiny_hf_model(hf_cfg)
    reference = HookedTransformer.from_pretrained(hf_model)
    model = HookedTransformer.from_pretrained(hf_model, device_map=device_map, offload_folder=tempfile.mkdtemp())
    on_disk = sorted(name for name, p in model.named_parameters() if p.is_meta)
    assert f"blocks.{hf_cfg.num_hidden_layers - 1}.attn.W_Q" in on_disk
    for name in VIEWS + extra:
        torch.testing.assert_close(getattr(model, name), getattr(reference, name), atol=0, rtol=0, msg=name)
    for circuit in ("QK", "OV"):
        torch.testing.assert_close(getattr(model, circuit).AB, getattr(reference, circuit).AB, atol=0, rtol=0)
    torch.testing.assert_close(model.tokens_to_residual_directions(torch.tensor([3, 5])),
                               reference.tokens_to_residual_directions(torch.tensor([3, 5])), atol=0, rtol=0)
    # Reading kept nothing in memory: the disk units are on meta again, and the forward is unchanged.
    assert sorted(name for name, p in model.named_parameters() if p.is_meta) == on_disk
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), atol=0, rtol=0)


def test_weights_loaded_gives_one_blocks_weights_and_puts_them_back():
    hf_model = tiny_hf_model(LLAMA)
    reference = HookedTransformer.from_pretrained(hf_model)
    model = HookedTransformer.from_pretrained(hf_model, device_map={"": "disk"}, offload_folder=tempfile.mkdtemp())
    assert model.blocks[2].attn.W_Q.is_meta  # outside a forward, a disk unit holds no values
    with weights_loaded(model.blocks[2]) as block:
        assert not any(p.is_meta for p in block.parameters())
        for name, p in block.named_parameters():
            torch.testing.assert_close(p, reference.blocks[2].get_parameter(name), atol=0, rtol=0, msg=name)
    assert all(p.is_meta for p in model.blocks[2].parameters())
    with weights_loaded(reference.blocks[0]) as block:  # a module with nothing offloaded is left as it is
        assert block.attn.W_Q is reference.blocks[0].attn.W_Q


def test_a_model_without_weights_is_refused_by_the_view_named():
    cfg = HookedTransformer.from_pretrained(tiny_hf_model(LLAMA)).cfg
    with torch.device("meta"):
        empty = HookedTransformer(cfg)
    for name in ("W_Q", "W_E", "W_gate"):
        with pytest.raises(ValueError, match=f"^{name}: the model's weights are on the meta device"):
            getattr(empty, name)


def test_views_of_a_model_loaded_with_load_offloaded_equal_the_plain_models():
    reference = HookedTransformer.from_pretrained(tiny_hf_model(LLAMA))
    folder = tempfile.mkdtemp()
    save_offloaded(reference, folder)
    model = load_offloaded(folder)
    assert all(p.is_meta for p in model.parameters())
    for name in VIEWS + ["W_gate", "b_gate"]:
        torch.testing.assert_close(getattr(model, name), getattr(reference, name), atol=0, rtol=0, msg=name)
