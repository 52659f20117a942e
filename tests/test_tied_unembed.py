"""A tied config whose checkpoint stores a *different* lm_head: we load what the installed transformers
loads (5.x keeps the stored lm_head and unties, 4.x overwrites it with the embedding), so the logits agree."""

import pytest
import safetensors.torch
import torch
import transformers

from conftest import TOL
from hooked_attn import HookedEncoder, HookedTransformer
from hooked_attn.architectures.parsers import TRANSFORMERS_MAJOR

CASES = {
    # family: (config, HF class, the key a checkpoint stores the unembedding under)
    "llama": (transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
              transformers.LlamaForCausalLM, "lm_head.weight"),
    "gpt2": (transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=32),
             transformers.GPT2LMHeadModel, "lm_head.weight"),
    # Pythia's hub checkpoints name it embed_out; transformers renames it to lm_head on load.
    "gpt_neox": (transformers.GPTNeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=48, tie_word_embeddings=True),
                 transformers.GPTNeoXForCausalLM, "embed_out.weight"),
    # lm_head.bias is never tied: stored and read either way.
    "phi": (transformers.PhiConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, tie_word_embeddings=True),
            transformers.PhiForCausalLM, "lm_head.weight"),
    # opt-350m's layout: a 16-wide table projected in and out (folded into W_E and W_U).
    "opt_projected": (transformers.OPTConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                                             num_attention_heads=4, max_position_embeddings=32,
                                             word_embed_proj_dim=16),
                      transformers.OPTForCausalLM, "lm_head.weight"),
    "bert_mlm": (transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=48, max_position_embeddings=40),
                 transformers.BertForMaskedLM, "cls.predictions.decoder.weight"),
}


@torch.no_grad()
@pytest.mark.parametrize("family", list(CASES))
def test_a_tied_config_with_a_different_stored_lm_head_gives_hf_logits(family, tmp_path):
    hf_cfg, cls, key = CASES[family]
    torch.manual_seed(0)
    cls(hf_cfg).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    sd = {k: v.clone() for k, v in safetensors.torch.load_file(path).items()}
    assert key not in sd  # save_pretrained drops the tied copy; we add a different one
    embed_key = next(k for k in sd if k.endswith(("embed_tokens.weight", "wte.weight", "embed_in.weight",
                                                  "word_embeddings.weight")))
    sd[key] = torch.randn_like(sd[embed_key])
    safetensors.torch.save_file(sd, path, metadata={"format": "pt"})

    hf = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = torch.randint(0, hf_cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    ours = _load_ours(cls, tmp_path)
    # The test can fail: the two candidate unembeddings give different logits.
    assert not torch.equal(sd[key], sd[embed_key])
    torch.testing.assert_close(ours(tokens), hf(tokens).logits, **TOL["tiny_fp32"])
    expected = sd[key] if TRANSFORMERS_MAJOR >= 5 else sd[embed_key]
    torch.testing.assert_close(ours.unembed.W_U.T, _project(expected, sd, "out"), rtol=0, atol=0)


EMBED_KEYS = {"llama": "model.embed_tokens.weight", "opt_projected": "model.decoder.embed_tokens.weight",
              "bert_mlm": "bert.embeddings.word_embeddings.weight"}


def _project(table, sd, side):
    """``table`` as our W_E (side "in") or W_U.T (side "out"): through OPT's project_in / project_out,
    when the checkpoint has them, as the converter folds them (float64, rounded once)."""
    p = sd.get(f"model.decoder.project_{side}.weight")
    if p is None:
        return table
    return (table.double() @ (p.double().T if side == "in" else p.double())).to(table.dtype)


def _load_ours(cls, folder):
    if cls is transformers.BertForMaskedLM:
        return HookedEncoder.from_pretrained(str(folder), center_unembed=False, fold_value_biases=False)
    return HookedTransformer.from_pretrained_no_processing(str(folder))


@torch.no_grad()
@pytest.mark.parametrize("family", list(EMBED_KEYS))
def test_a_tied_checkpoint_that_stores_only_the_lm_head_ties_the_embedding_to_it(family, tmp_path):
    """transformers 5 swaps the tie when only the lm_head is stored (4.57 cannot load such a
    checkpoint at all: its embedding stays on the meta device); we take the stored lm_head for both."""
    hf_cfg, cls, key = CASES[family]
    torch.manual_seed(0)
    cls(hf_cfg).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    sd = dict(safetensors.torch.load_file(path))
    sd[key] = sd.pop(EMBED_KEYS[family]) * 3
    safetensors.torch.save_file(sd, path, metadata={"format": "pt"})
    ours = _load_ours(cls, tmp_path)
    tokens = torch.randint(0, hf_cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours.embed.W_E, _project(sd[key], sd, "in"), rtol=0, atol=0)
    torch.testing.assert_close(ours.unembed.W_U.T, _project(sd[key], sd, "out"), rtol=0, atol=0)
    if TRANSFORMERS_MAJOR >= 5:
        hf = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
        assert torch.equal(hf.get_input_embeddings().weight, sd[key])  # HF tied the embedding to it
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, **TOL["tiny_fp32"])
