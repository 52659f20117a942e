"""Processing in bounded slices (to keep load memory flat) gives the same weights as processing whole
tensors, in place or not, for fp32 and bf16, on LayerNorm and RMSNorm families."""

import pytest
import torch
import transformers

from hooked_attn import HookedTransformer, processing, weight_writer
from tests.conftest import tiny_hf_model

CONFIGS = {
    "gpt2": transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=101),
    "llama": transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=32),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_sliced_and_in_place_processing_equal_whole_tensor_processing(family, dtype, monkeypatch):
    raw = HookedTransformer.from_pretrained_no_processing(tiny_hf_model(CONFIGS[family]), dtype=dtype)
    sd = dict(raw.state_dict())
    whole, cfg_whole = processing.process_weights(sd, raw.cfg)
    monkeypatch.setattr(weight_writer, "SLICE_ELEMENTS", 7)  # forces many slices on every tensor
    own = dict(sd)
    sliced, cfg_sliced = processing.process_weights(own, raw.cfg, inplace=True)
    assert sliced is own and cfg_sliced == cfg_whole
    assert set(sliced) == set(whole)
    for key in whole:
        torch.testing.assert_close(sliced[key], whole[key], rtol=1e-6, atol=1e-6 if dtype == torch.float32 else 1e-2,
                                   msg=key)
        assert sliced[key].dtype == whole[key].dtype == dtype
    for key, tensor in raw.state_dict().items():  # the input tensors were never written to
        torch.testing.assert_close(sd[key], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_overwriting_owned_tensors_gives_the_same_weights(family, dtype, monkeypatch):
    # The loader lets processing overwrite the tensors it has just read. A tensor whose storage another
    # entry shares (a tied W_U is a view of W_E) must still be replaced, not written through.
    raw = HookedTransformer.from_pretrained_no_processing(tiny_hf_model(CONFIGS[family]), dtype=dtype)
    sd = {k: v.clone() for k, v in raw.state_dict().items()}
    whole, cfg_whole = processing.process_weights(sd, raw.cfg)
    monkeypatch.setattr(weight_writer, "SLICE_ELEMENTS", 7)
    own = {k: v.clone() for k, v in sd.items()}
    own["unembed.W_U"] = own["embed.W_E"].T  # tied, as a checkpoint without lm_head.weight loads
    whole_tied, _ = processing.process_weights({**sd, "unembed.W_U": sd["embed.W_E"].T}, raw.cfg)
    storage = {k: v.untyped_storage().data_ptr() for k, v in own.items()}
    out, cfg_out = processing.process_weights(own, raw.cfg, inplace=True, owned=lambda t: True)
    assert out is own and cfg_out == cfg_whole
    atol = 1e-6 if dtype == torch.float32 else 1e-2
    for key in whole_tied:
        torch.testing.assert_close(out[key], whole_tied[key], rtol=1e-6, atol=atol, msg=key)
    overwritten = {k for k in out if out[k].untyped_storage().data_ptr() == storage[k] and k != "embed.W_E"}
    assert "blocks.0.attn.W_Q" in overwritten and "blocks.1.mlp.W_in" in overwritten  # no second copy made
    assert out["unembed.W_U"].untyped_storage().data_ptr() != out["embed.W_E"].untyped_storage().data_ptr()
    for key in whole:  # nothing that ``sd`` holds was touched
        torch.testing.assert_close(sd[key], raw.state_dict()[key], rtol=0, atol=0, msg=key)

