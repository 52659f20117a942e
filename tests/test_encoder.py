"""HookedEncoder: BERT models rebuilt with the same hook vocabulary, equal to HF."""

import pytest
import torch
import transformers

from conftest import TOL, randomize_
from hooked_attn import HookedEncoder, HookedTransformer, UnknownArchitectureError
from hooked_attn.architectures.bert import tiny_hf_configs

VARIANTS = list(tiny_hf_configs().items())


def tiny_bert(cfg, cls):
    torch.manual_seed(0)
    return randomize_(cls._from_config(cfg, attn_implementation="eager").eval())


@pytest.fixture(params=VARIANTS, ids=[name for name, _ in VARIANTS])
def hf_cfg(request):
    return request.param[1]


def inputs(cfg):
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.vocab_size, (3, 10), generator=gen)
    token_types = torch.randint(0, cfg.type_vocab_size, (3, 10), generator=gen)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return tokens, token_types, mask


@torch.no_grad()
def test_bert_model_hidden_states_equal_hf(hf_cfg):
    hf = tiny_bert(hf_cfg, transformers.BertModel)
    tokens, types, mask = inputs(hf_cfg)
    ref = hf(tokens, token_type_ids=types, attention_mask=mask, output_hidden_states=True)
    model = HookedEncoder.from_pretrained(hf)
    ours, cache = model.run_with_cache(tokens, token_type_ids=types, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], ref.last_hidden_state[valid], **TOL["tiny_fp32"])
    torch.testing.assert_close(model(tokens, token_type_ids=types, attention_mask=mask)[valid],
                               ref.last_hidden_state[valid], **TOL["tiny_fp32"])  # fused attention path
    for layer in range(hf_cfg.num_hidden_layers):
        torch.testing.assert_close(cache["resid_post", layer][valid], ref.hidden_states[layer + 1][valid],
                                   **TOL["tiny_fp32"])
    assert torch.all(cache["pattern", 0][2, :, :, 4:] == 0)  # padding is never attended to


@torch.no_grad()
@pytest.mark.parametrize("processed", [False, True])
def test_bert_for_masked_lm_logits_equal_hf(hf_cfg, processed):
    hf = tiny_bert(hf_cfg, transformers.BertForMaskedLM)
    tokens, types, mask = inputs(hf_cfg)
    ref = hf(tokens, token_type_ids=types, attention_mask=mask).logits
    model = HookedEncoder.from_pretrained(hf, center_unembed=processed, fold_value_biases=processed)
    ours = model(tokens, token_type_ids=types, attention_mask=mask)
    valid = mask.bool()
    if processed:
        torch.testing.assert_close(ours.log_softmax(-1)[valid], ref.log_softmax(-1)[valid], **TOL["tiny_fp32"])
        assert model.cfg.processing.center_unembed and model.cfg.processing.fold_value_biases
        assert not model.cfg.processing.fold_ln  # post-LN: skipped
    else:
        torch.testing.assert_close(ours[valid], ref[valid], **TOL["tiny_fp32"])


def test_encoder_hooks_share_the_decoder_vocabulary():
    hf = tiny_bert(tiny_hf_configs()["default"], transformers.BertForMaskedLM)
    model = HookedEncoder.from_pretrained(hf)
    names = set(model.hook_dict)
    for name in ("hook_embed", "hook_pos_embed", "hook_token_type_embed", "embed_ln.hook_normalized",
                 "blocks.0.attn.hook_q", "blocks.0.attn.hook_pattern", "blocks.1.hook_resid_mid",
                 "blocks.1.ln2.hook_scale", "blocks.1.mlp.hook_post", "mlm_head.ln.hook_normalized"):
        assert name in names
    tokens = torch.randint(0, 99, (2, 6))
    _, cache = model.run_with_cache(tokens)
    assert cache["pattern", 1].shape == (2, 4, 6, 6)
    row = cache["pattern", 1][0, 0, 0]
    assert torch.all(row > 0)  # bidirectional: the first token sees the last one
    edited = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, hook: p * 0)])
    assert not torch.allclose(edited, model(tokens))
    assert model.n_hooks() == 0


def test_decoders_and_encoders_point_at_each_other():
    bert = tiny_bert(tiny_hf_configs()["default"], transformers.BertModel)
    with pytest.raises(UnknownArchitectureError, match="BertModel"):
        HookedTransformer.from_pretrained(bert)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    # The one registry (kind "encoder" / "decoder") names the model class that loads it.
    with pytest.raises(UnknownArchitectureError,
                       match=r"not supported as an encoder \(GPT2LMHeadModel is a decoder: load it with HookedTransformer"):
        HookedEncoder.from_pretrained(gpt2)
