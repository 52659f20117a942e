"""How converters read HF config fields: derived fields are checked against what the converter computes."""

import pytest
from transformers import FalconConfig, LlamaConfig

from hooked_attn.architectures import REGISTRY
from hooked_attn.architectures.base import UnsupportedConfigError, check_hf_config

FALCON = REGISTRY["FalconForCausalLM"]


def _falcon(**fields) -> FalconConfig:
    return FalconConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **fields)


@pytest.mark.parametrize(("fields", "n_kv"), [
    ({"multi_query": False}, 4),  # every head its own K/V
    ({"new_decoder_architecture": True, "num_kv_heads": 2}, 2),
    ({}, 1),  # multi_query (the default): one K/V head
])
def test_a_derived_field_equal_to_ours_is_accepted(fields, n_kv):
    """FalconConfig stores num_key_value_heads from transformers 5.25 on (derived from multi_query,
    new_decoder_architecture and num_kv_heads); older releases do not. Either way, the value our
    converter computes from the fields it reads is accepted."""
    hf = _falcon(**fields)
    hf.num_key_value_heads = n_kv  # what 5.25 stores; set here so older releases test the same path
    check_hf_config(hf, FALCON)
    assert FALCON.config_from_hf(hf).n_kv_heads == n_kv


def test_a_derived_field_that_disagrees_is_refused():
    hf = _falcon(multi_query=False)
    hf.num_key_value_heads = 2  # transformers would derive 4: a config edited by hand, or a new meaning
    with pytest.raises(UnsupportedConfigError, match=r"config field num_key_value_heads=2 \(default 1\) is not "
                                                     r"supported by hooked_attn's converter"):
        check_hf_config(hf, FALCON)


def test_a_handled_field_is_never_second_guessed():
    """LLaMA handles num_key_value_heads itself: the derived-field check does not apply to it."""
    hf = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=48)
    check_hf_config(hf, REGISTRY["LlamaForCausalLM"])
