"""Loading from an in-memory HF model: by default its weights are copied and never written to; with
release_source=True they are taken (no second copy) and the HF model is left empty, but only once the
conversion has succeeded."""

import pytest
import torch
import transformers
from torch import nn

from hooked_attn import HookedTransformer, StateDictError
from tests.conftest import tiny_hf_model

CONFIGS = {
    "gpt2": transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=101),
    "llama": transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=32),
}
TOKENS = torch.arange(12)[None] % 101


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_loading_an_in_memory_model_never_writes_to_it(family):
    hf = tiny_hf_model(CONFIGS[family])
    before = snapshot(hf)
    HookedTransformer.from_pretrained(hf)
    for key, tensor in hf.state_dict().items():
        torch.testing.assert_close(tensor, before[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_release_source_takes_the_weights_and_empties_the_hf_model(family):
    hf = tiny_hf_model(CONFIGS[family])
    copied = HookedTransformer.from_pretrained(hf)
    # Only the address is kept: a reference to the weight would be something else holding it, and such a
    # weight is copied, never processed in place (see test_loading_errors.py).
    q_proj = hf.model.layers[0].self_attn.q_proj.weight.untyped_storage().data_ptr() if family == "llama" else None
    taken = HookedTransformer.from_pretrained(hf, release_source=True)
    torch.testing.assert_close(taken(TOKENS), copied(TOKENS), rtol=0, atol=0)
    assert all(t.is_meta for t in hf.state_dict().values())  # the HF model holds no memory now
    if q_proj is not None:  # LLaMA's W_Q is q_proj's own storage, processed in place: no copy was made
        assert taken.blocks[0].attn.W_Q.untyped_storage().data_ptr() == q_proj


def test_release_source_leaves_the_hf_model_whole_when_conversion_fails():
    hf = tiny_hf_model(CONFIGS["llama"])
    hf.model.register_parameter("surprise", nn.Parameter(torch.zeros(3)))  # a weight no conversion accounts for
    before = snapshot(hf)
    with pytest.raises(StateDictError, match="surprise"):
        HookedTransformer.from_pretrained(hf, release_source=True)
    after = hf.state_dict()
    assert set(after) == set(before)
    for key, tensor in after.items():
        assert not tensor.is_meta, key
        torch.testing.assert_close(tensor, before[key], rtol=0, atol=0, msg=key)


def test_release_source_needs_an_in_memory_model(tmp_path):
    tiny_hf_model(CONFIGS["gpt2"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="release_source"):
        HookedTransformer.from_pretrained(tmp_path, release_source=True)
