"""all-MiniLM-L6-v2 (a 6-layer BERT), from the registry package that ships it: HookedEncoder equals HF."""

import pytest
import torch
import transformers

from hooked_attn import HookedEncoder
from hooked_attn.default_model import prepare_minilm

pytestmark = pytest.mark.real_weights
TEXTS = ["The capital of France is Paris.", "A man is playing a guitar on stage.", "short"]


@pytest.fixture(scope="module")
def folder():
    return prepare_minilm()


@torch.no_grad()
def test_minilm_hidden_states_equal_hf(folder):
    hf = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    model = HookedEncoder.from_pretrained(folder)
    assert model.tokenizer is not None and not hasattr(model, "unembed")
    tokens, mask = model.tokenize(TEXTS)
    assert model.to_str_tokens(TEXTS[2]) == ["[CLS]", "short", "[SEP]"]
    ref = hf(tokens, attention_mask=mask, output_hidden_states=True)
    ours, cache = model.run_with_cache(tokens, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], ref.last_hidden_state[valid], atol=1e-4, rtol=1e-4)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(cache["resid_post", layer][valid], ref.hidden_states[layer + 1][valid],
                                   atol=1e-4, rtol=1e-4)
    # Sentence embeddings (mean pooling, as sentence-transformers does) rank the pairs sensibly.
    pooled = (ours * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    ref_pooled = torch.nn.functional.normalize((ref.last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-5)
