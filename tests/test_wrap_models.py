"""wrap() on real packages' models with random weights: TabPFN (v2 and v3.5) and HF families we do not rebuild.

Every SDPA call is hooked (counted independently), the output is unchanged, patterns sum to 1 and
equal a hand computation from the hooked q and k; HF patterns equal HF's eager ``output_attentions``.
"""

import pytest
import tabpfn.architectures.tabpfn_v2 as tabpfn_v2
import tabpfn.architectures.tabpfn_v3_5 as tabpfn_v3_5
import torch
import transformers

from hooked_attn import wrap
from _sdpa import CountSdpa, hand_pattern

TABPFN = {
    "v2": lambda: tabpfn_v2.get_architecture(tabpfn_v2.parse_config(
        {"max_num_classes": 10, "num_buckets": 100, "nlayers": 2, "emsize": 48, "nhead": 4})[0]),
    # The newest architecture in tabpfn 9.2.0, shrunk (the defaults have 24 ICL layers).
    "v3_5": lambda: tabpfn_v3_5.get_architecture(tabpfn_v3_5.parse_config({
        "max_num_classes": 10, "num_buckets": 100, "nlayers": 2, "embed_dim": 32, "dist_embed_num_blocks": 1,
        "feat_agg_num_blocks": 1, "icl_num_heads": 4, "dist_embed_num_heads": 4, "feat_agg_num_heads": 4,
        "decoder_num_heads": 2, "decoder_head_dim": 16, "dist_embed_num_inducing_points": 8})[0]),
}


@pytest.mark.parametrize("version", list(TABPFN))
def test_tabpfn_every_attention_call_is_hooked(version: str) -> None:
    torch.manual_seed(0)
    model = TABPFN[version]().eval()
    x, y = torch.randn(20, 1, 5), torch.randint(0, 3, (15, 1)).float()  # 15 train rows, 5 test rows
    args = (x, y) if version == "v2" else (x, y, "multiclass")
    counter = CountSdpa()
    with torch.no_grad():
        with counter:
            expected = model(*args)
        wrapped = wrap(model)
    with torch.inference_mode():  # as tabpfn's own predict runs its model
        out, cache = wrapped.run_with_cache(*args)
    assert torch.equal(out, expected)
    assert len(wrapped.attention_layers) == counter.n > 0
    for layer, prefix in enumerate(wrapped.attention_layers):
        pattern = cache["pattern", layer]
        assert pattern.shape[-1] == cache[f"{prefix}.hook_k"].shape[1]
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
        torch.testing.assert_close(pattern, hand_pattern(cache[f"{prefix}.hook_q"], cache[f"{prefix}.hook_k"]))
    if version == "v2":
        assert wrapped.attention_layers[:3] == ["blocks.0.per_sample_attention_between_features",
                                                "blocks.0.per_column_attention_between_cells",  # train -> train
                                                "blocks.0.per_column_attention_between_cells.call_1"]  # test -> train
        assert cache["pattern", 2].shape[-2:] == (5, 15)


def _tiny_hf() -> dict[str, tuple]:
    ids, dec = torch.randint(0, 99, (2, 7)), torch.randint(0, 99, (2, 5))
    pad = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    return {
        "vit": (transformers.ViTModel, transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=16,
            patch_size=4), {"pixel_values": torch.randn(2, 3, 16, 16)}, None),
        "t5": (transformers.T5Model, transformers.T5Config(
            vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4),
            {"input_ids": ids, "decoder_input_ids": dec, "attention_mask": pad}, None),
        "whisper": (transformers.WhisperModel, transformers.WhisperConfig(
            vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=8, max_source_positions=10,
            max_target_positions=20, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
            {"input_features": torch.randn(2, 8, 20), "decoder_input_ids": dec}, None),
        # Not in hooked_attn's registry; grouped-query attention and left padding.
        "helium": (transformers.HeliumForCausalLM, transformers.HeliumConfig(
            vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8), {"input_ids": ids, "attention_mask": pad.flip(1)}, pad.flip(1)),
    }


HF_ATTENTIONS = {  # HF's output_attentions fields, in the order wrap numbers the calls
    "vit": lambda out: list(out.attentions),
    "t5": lambda out: [*out.encoder_attentions, *[a for pair in zip(out.decoder_attentions, out.cross_attentions)
                                                   for a in pair]],
    "whisper": lambda out: [*out.encoder_attentions, *[a for pair in zip(out.decoder_attentions,
                                                                         out.cross_attentions) for a in pair]],
    "helium": lambda out: list(out.attentions),
}


@pytest.mark.parametrize("family", list(HF_ATTENTIONS))
def test_hf_patterns_equal_eager_output_attentions(family: str) -> None:
    torch.manual_seed(0)
    model_class, config, inputs, query_mask = _tiny_hf()[family]
    config._attn_implementation = "eager"
    model = model_class(config).eval()
    with torch.no_grad():
        reference = model(**inputs, output_attentions=True)
        model.set_attn_implementation("sdpa")
        wrapped = wrap(model)
        out, cache = wrapped.run_with_cache(**inputs, names_filter=lambda name: name.endswith("hook_pattern"))
        unhooked = wrapped(**inputs)
    expected = HF_ATTENTIONS[family](reference)
    assert len(wrapped.attention_layers) == len(expected) == len(cache)
    for layer, hf_pattern in enumerate(expected):
        ours = cache["pattern", layer]
        if query_mask is not None:  # a padded query: HF eager spreads it evenly, SDPA (and we) give zeros
            ours, hf_pattern = ours.transpose(1, 2)[query_mask.bool()], hf_pattern.transpose(1, 2)[query_mask.bool()]
        torch.testing.assert_close(ours, hf_pattern, atol=1e-5, rtol=1e-5)
    first = next(iter(out.values())) if isinstance(out, dict) else out[0]
    torch.testing.assert_close(first, next(iter(unhooked.values())), atol=0, rtol=0)
