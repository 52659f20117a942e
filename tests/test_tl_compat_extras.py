"""TransformerLens compatibility, session 5: model names, default_prepend_bos, tokenize_and_concatenate,
ioi_eval / mmlu, SVDInterpreter."""

import pytest
import torch
import transformers

from hooked_attn.default_model import gpt2_tokenizer
from tests.test_tl_compat import tl  # noqa: F401  (the fixture: transformer_lens installed for one test)


def test_short_names_resolve_and_transformer_lens_format_checkpoints_are_refused(tl):
    from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES, get_official_model_name

    assert get_official_model_name("gpt2-small") == "gpt2" and "gpt2" in OFFICIAL_MODEL_NAMES
    assert get_official_model_name("Pythia-70M") == "EleutherAI/pythia-70m"
    assert get_official_model_name("some/hf-model") == "some/hf-model"
    with pytest.raises(ValueError, match="TransformerLens-format checkpoint"):
        tl.HookedTransformer.from_pretrained("solu-1l")


def test_default_prepend_bos_sets_what_to_tokens_does(tl):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16))
    tok = gpt2_tokenizer()
    plain = tl.HookedTransformer.from_pretrained(hf, tokenizer=tok)
    with_bos = tl.HookedTransformer.from_pretrained(hf, tokenizer=tok, default_prepend_bos=True)
    assert plain.to_tokens("Hello world").tolist() == [[15496, 995]]  # GPT-2's tokenizer adds no BOS itself
    assert with_bos.to_tokens("Hello world").tolist() == [[50256, 15496, 995]]
    assert with_bos.to_tokens("Hello world", prepend_bos=False).tolist() == [[15496, 995]]
    with pytest.raises(ValueError, match="default_prepend_bos"):
        tl.HookedTransformer.from_pretrained(hf, tokenizer=tok, default_prepend_bos="yes")


def test_tokenize_and_concatenate_cuts_rows_of_whole_tokens(tl):
    datasets = pytest.importorskip("datasets")
    from transformer_lens.utils import tokenize_and_concatenate

    tok = gpt2_tokenizer()
    docs = ["Military vehicles " * 40, "abcdefghij" * 30]
    out = tokenize_and_concatenate(datasets.Dataset.from_dict({"text": docs}), tok, max_length=16, num_proc=None)
    stream = tok(docs[0])["input_ids"] + [tok.eos_token_id] + tok(docs[1])["input_ids"]
    rows = out[:]["tokens"]
    assert rows.shape == (len(stream) // 15, 16) and (rows[:, 0] == tok.bos_token_id).all()
    assert rows[:, 1:].flatten().tolist() == stream[: rows.shape[0] * 15]  # whole tokens, in order
    short = tokenize_and_concatenate(datasets.Dataset.from_dict({"text": ["Hello"]}), tok, max_length=8,
                                     add_bos_token=False, streaming=True)
    assert short[0]["tokens"].tolist() == [15496] + [tok.eos_token_id] * 7  # padded with EOS (no pad token)


def test_ioi_eval_reads_each_prompt_at_its_last_token(tl):
    from transformer_lens.evals import IOIDataset, ioi_eval

    tok = gpt2_tokenizer()
    cfg = tl.HookedTransformerConfig(n_layers=1, d_model=16, d_head=4, n_ctx=32, d_vocab=tok.vocab_size,
                                     act_fn="relu", seed=0)
    model = tl.HookedTransformer(cfg, tokenizer=tok)
    ds = IOIDataset(tok, templates=["[A] met with [B]. [B] gave the [OBJECT] to [A]"], names=["Alice", "Bob"],
                    nouns={"OBJECT": ["ball", "book and pen"]}, num_samples=6, seed=1)
    assert all(s["text"].endswith(" to") for s in ds.samples)  # the answer [A] is not part of the prompt
    result = ioi_eval(model, dataset=ds, batch_size=4)  # prompts of two lengths: padded batches
    diffs = []
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            last = model(item["prompt"][None])[0, -1]
            diffs.append(float(last[item["IO"][0]] - last[item["S"][0]]))
    assert result["Logit Difference"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-5)
    assert result["Accuracy"] == pytest.approx(sum(d > 0 for d in diffs) / len(diffs))


def test_mmlu_refuses_an_unknown_subject_before_downloading(tl):
    from transformer_lens.evals import make_mmlu_data_loader

    with pytest.raises(ValueError, match="Invalid subject"):
        make_mmlu_data_loader(subjects=["anatomy", "astrology"])


def test_svd_interpreter_finds_a_rank_one_direction(tl):
    from jaxtyping import TypeCheckError

    model = tl.HookedTransformer(tl.HookedTransformerConfig(n_layers=2, d_model=8, d_head=4, n_ctx=4, d_vocab=11,
                                                            act_fn="relu", seed=0))
    b = torch.randn(8)
    with torch.no_grad():
        model.blocks[1].mlp.W_out.copy_(torch.outer(torch.randn(32), b))  # W_out = a b^T writes only along b
    svd = tl.SVDInterpreter(model)
    top = svd.get_singular_vectors("w_out", layer_index=1, num_vectors=3)
    assert top.shape == (11, 1, 3)
    expected = (b / b.norm()) @ model.W_U
    torch.testing.assert_close(top[:, 0, 0].abs(), expected.abs(), atol=1e-5, rtol=1e-5)
    assert svd.get_singular_vectors("OV", layer_index=0, num_vectors=2, head_index=1).shape == (11, 1, 2)
    with pytest.raises(TypeCheckError):
        svd.get_singular_vectors("QK", layer_index=0, head_index=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Head index optional only for w_in and w_out, got OV"):
        svd.get_singular_vectors("OV", layer_index=0)
    with pytest.raises(AssertionError, match="Layer index must be between 0 and 1 but got 2"):
        svd.get_singular_vectors("w_in", layer_index=2)
