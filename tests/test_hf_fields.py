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
    with pytest.raises(UnsupportedConfigError, match=r"config field num_key_value_heads=2 \(default \w+\) is not "
                                                     r"supported by hooked_attn's converter"):
        check_hf_config(hf, FALCON)


def test_a_handled_field_is_never_second_guessed():
    """LLaMA handles num_key_value_heads itself: the derived-field check does not apply to it."""
    hf = LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=48)
    check_hf_config(hf, REGISTRY["LlamaForCausalLM"])


def recording(hf):
    """A copy of an HF config (of a subclass of its class, so type checks hold) that records the name
    of every attribute read from it, and that set."""
    read: set[str] = set()

    class Recording(type(hf)):
        def __getattribute__(self, name: str):
            if not name.startswith("__"):
                read.add(name)
            return super().__getattribute__(name)

    proxy = object.__new__(Recording)
    object.__getattribute__(proxy, "__dict__").update(hf.__dict__)
    return proxy, read


ARCHS = sorted(REGISTRY.values(), key=lambda a: a.hf_architecture)
# Declared handled, but not read by the converter on any test variant; each with the reason it is safe.
# This list may only shrink.
NOT_READ = {
    # Read through the fields transformers derives from them at config construction (what the model reads).
    ("GPTNeoForCausalLM", "attention_types"): "expanded into attention_layers, which is read",
    ("Qwen2ForCausalLM", "use_sliding_window"): "derived into sliding_window / layer_types, which are read",
    ("Qwen2ForCausalLM", "max_window_layers"): "derived into layer_types, which is read",
    ("Qwen3ForCausalLM", "use_sliding_window"): "derived into sliding_window / layer_types, which are read",
    ("Qwen3ForCausalLM", "max_window_layers"): "derived into layer_types, which is read",
    ("GPT2LMHeadModel", "reorder_and_upcast_attn"): "changes rounding in reduced precision only",
    # Read only when the checkpoint lacks the key it governs (every test checkpoint has it).
    ("GPTNeoXForCausalLM", "tie_word_embeddings"): "read when lm_head/embed_out is absent",
    ("LlamaForCausalLM", "attention_bias"): "biases are popped when present (pop_attention bias='optional')",
    # BERT uses the decoder weight when present; BertModel has no head to tie.
    ("BertForMaskedLM", "tie_word_embeddings"): "the decoder weight is used when present",
    ("BertModel", "tie_word_embeddings"): "no masked-LM head",
}


@pytest.mark.parametrize("arch", ARCHS, ids=[a.hf_architecture for a in ARCHS])
def test_handled_fields_are_read_and_read_fields_are_declared(arch):
    """Over all of a family's test variants, the converter (config_from_hf and convert_state_dict) reads
    every field it declares handled that the config carries, and reads no config field it has not
    declared (handled or ignored): a handled field never read is the silently wrong model this library
    exists to prevent, and an undeclared one could be refused by check_hf_config for no reason."""
    import transformers

    from hooked_attn.architectures.base import COMMON_IGNORED_HF_FIELDS

    read, present = set(), set()
    for hf_cfg in arch.tiny_hf_configs().values():
        proxy, reads = recording(hf_cfg)
        cfg = arch.config_from_hf(proxy)
        if arch.kind == "encoder":
            hf = getattr(transformers, arch.hf_architecture)(hf_cfg)
        else:
            hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
        arch.convert_state_dict(hf.state_dict(), cfg, proxy)
        read |= reads
        present |= set(hf_cfg.to_dict())
    never_read = {f for f in (arch.handled_hf_fields & present) - read if (arch.hf_architecture, f) not in NOT_READ}
    assert not never_read, f"declared handled but never read: {sorted(never_read)}"
    declared = arch.handled_hf_fields | arch.ignored_hf_fields | COMMON_IGNORED_HF_FIELDS
    undeclared = (read & present) - declared
    assert not undeclared, f"read but not declared: {sorted(undeclared)}"
