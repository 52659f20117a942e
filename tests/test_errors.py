"""Bad input gets a clear error that names what was wrong, and leaves the model as it was."""

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from conftest import random_tokens, tiny_hf_model
from hooked_attn import HookedTransformer
from hooked_attn.architectures import REGISTRY
from hooked_attn.architectures.base import StateDictError, UnknownArchitectureError, UnsupportedConfigError
from hooked_attn.architectures.gpt2 import tiny_hf_configs as gpt2_configs
from hooked_attn.architectures.llama import tiny_hf_configs as llama_configs


def test_unknown_architecture_lists_the_supported_ones():
    # A state-space model: not a transformer, so never in the registry.
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.MambaConfig(hidden_size=16, num_hidden_layers=1, state_size=4, vocab_size=50))
    with pytest.raises(UnknownArchitectureError, match="MambaForCausalLM.*GPT2LMHeadModel.*LlamaForCausalLM"):
        HookedTransformer.from_pretrained(hf)


@pytest.mark.parametrize(("field", "value"), [("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
                                              ("mlp_bias", True), ("hidden_act", "tanh")])
def test_llama_config_fields_the_converter_cannot_honour_are_refused(field, value):
    cfg = llama_configs()["gqa"]
    setattr(cfg, field, value)
    hf = transformers.LlamaForCausalLM(llama_configs()["gqa"])
    hf.config = cfg
    with pytest.raises(UnsupportedConfigError, match=field.split("_")[0]):
        HookedTransformer.from_pretrained(hf)


def test_an_unknown_config_field_that_differs_from_its_default_is_named():
    hf = tiny_hf_model(gpt2_configs()["default"])
    hf.config.some_new_feature = 3
    with pytest.raises(UnsupportedConfigError, match="some_new_feature=3"):
        HookedTransformer.from_pretrained(hf)
    hf.config.some_new_feature = None  # equal to "absent": nothing to refuse
    HookedTransformer.from_pretrained(hf)


def test_cross_attention_gpt2_is_refused():
    cfg = gpt2_configs()["default"]
    cfg.add_cross_attention = True
    hf = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(UnsupportedConfigError, match="add_cross_attention"):
        HookedTransformer.from_pretrained(hf)


@pytest.fixture
def saved_llama(tmp_path):
    hf = tiny_hf_model(llama_configs()["gqa"])
    hf.save_pretrained(tmp_path)
    return tmp_path


def _edit_weights(folder, edit):
    path = folder / "model.safetensors"
    sd = dict(load_file(path))
    edit(sd)
    save_file(sd, path, metadata={"format": "pt"})


def test_missing_key_is_named(saved_llama):
    _edit_weights(saved_llama, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(StateDictError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        HookedTransformer.from_pretrained(saved_llama)


def test_unexpected_key_is_named(saved_llama):
    _edit_weights(saved_llama, lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    with pytest.raises(StateDictError, match=r"unexpected keys.*model\.layers\.0\.extra\.weight"):
        HookedTransformer.from_pretrained(saved_llama)


def test_misshaped_key_is_named_with_both_shapes(saved_llama):
    _edit_weights(saved_llama, lambda sd: sd.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(8, 32)))
    with pytest.raises(StateDictError, match=r"k_proj\.weight.*\(8, 32\).*\(16, 32\)"):
        HookedTransformer.from_pretrained(saved_llama)


def test_truncated_safetensors_is_reported_with_its_path(saved_llama):
    path = saved_llama / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        HookedTransformer.from_pretrained(saved_llama)


def test_missing_sources_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HookedTransformer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HookedTransformer.from_pretrained(tmp_path / "model.gguf")
    with pytest.raises(FileNotFoundError, match="hub"):
        HookedTransformer.from_pretrained("no-such-org/no-such-model-xyz")


@pytest.fixture
def gpt2():
    cfg = gpt2_configs()["default"]
    return HookedTransformer.from_pretrained_no_processing(tiny_hf_model(cfg)), random_tokens(cfg)


def test_token_ids_out_of_range_are_named(gpt2):
    model, tokens = gpt2
    bad = tokens.clone()
    bad[1, 3] = model.cfg.d_vocab
    with pytest.raises(ValueError, match=f"token id {model.cfg.d_vocab} is out of range"):
        model(bad)
    bad[1, 3] = -1
    with pytest.raises(ValueError, match="token id -1"):
        model(bad)


def test_sequences_longer_than_learned_positions_are_refused(gpt2):
    model, _ = gpt2
    with pytest.raises(ValueError, match="n_ctx=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_empty_and_malformed_inputs(gpt2):
    model, tokens = gpt2
    with pytest.raises(ValueError, match="at least one token"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \[batch pos\]"):
        model(tokens[0])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(tokens, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="no tokenizer"):
        model("hello")
    with pytest.raises(ValueError, match="start_at_layer"):
        model(torch.randn(2, 9, 32))


def test_every_registered_architecture_has_variants():
    assert {"GPT2LMHeadModel", "LlamaForCausalLM"} <= set(REGISTRY)
    for arch in REGISTRY.values():
        assert arch.tiny_hf_configs(), arch.hf_architecture


def test_absent_weights_say_why(gpt2):
    model, _ = gpt2
    with pytest.raises(AttributeError, match="not gated"):
        model.W_gate
    llama = HookedTransformer.from_pretrained_no_processing(tiny_hf_model(llama_configs()["gqa"]))
    with pytest.raises(AttributeError, match="rotary positions"):
        llama.W_pos
    assert llama.W_gate.shape == (2, 32, 48) and model.W_pos.shape == (32, 32)


def test_cache_membership_never_raises(gpt2):
    model, tokens = gpt2
    _, cache = model.run_with_cache(tokens, names_filter="hook_embed")
    assert "hook_embed" in cache and ("embed",) in cache
    assert 5 not in cache and "not_a_site" not in cache and ("pattern", 0) not in cache


def test_a_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    for missing in (str(tmp_path / "nope"), "./nope", "some/deep/path"):
        with pytest.raises(FileNotFoundError, match="no such model folder"):
            HookedTransformer.from_pretrained(missing)


def test_processing_flags_are_keyword_only(gpt2):
    with pytest.raises(TypeError):
        HookedTransformer.from_pretrained(tiny_hf_model(gpt2_configs()["default"]), None, torch.float32)


def test_pytorch_bin_checkpoints_load(tmp_path):
    hf = tiny_hf_model(gpt2_configs()["untied"])
    hf.config.save_pretrained(tmp_path)  # transformers 5 saves safetensors only: write the .bin by hand
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    tokens = random_tokens(hf.config)
    model = HookedTransformer.from_pretrained_no_processing(tmp_path)
    torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-5)
