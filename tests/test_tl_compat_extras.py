"""TransformerLens compatibility, session 5: model names, default_prepend_bos, tokenize_and_concatenate,
ioi_eval / mmlu, SVDInterpreter, stand-alone Attention / GroupedQueryAttention / MoE, has_hooks errors."""

import pytest
import torch
import transformers

import hooked_attn
from hooked_attn.default_model import gpt2_tokenizer


def test_short_names_resolve_and_transformer_lens_format_checkpoints_are_refused(tl):
    from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES, get_official_model_name

    assert get_official_model_name("gpt2-small") == "gpt2" and "gpt2" in OFFICIAL_MODEL_NAMES
    assert get_official_model_name("Pythia-70M") == "EleutherAI/pythia-70m"
    assert get_official_model_name("some/hf-model") == "some/hf-model"
    with pytest.raises(ValueError, match="TransformerLens-format checkpoint"):
        tl.HookedTransformer.from_pretrained("solu-1l")
    from transformer_lens.loading_from_pretrained import check_not_native

    check_not_native("someone/solu-1l")  # a repository id or a local folder is not TransformerLens' short name


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


@pytest.mark.parametrize("options", [
    dict(attn_scores_soft_cap=3.0),
    dict(positional_embedding_type="rotary", n_key_value_heads=2),
    dict(positional_embedding_type="rotary", rotary_dim=2, rotary_adjacent_pairs=True),
    dict(positional_embedding_type="alibi"),
], ids=["mha-softcap", "rotary-gqa", "partial-rotary-adjacent", "alibi"])
def test_standalone_attention_computes_what_the_model_computes(tl, options):
    from transformer_lens.cache import TransformerLensKeyValueCacheEntry
    from transformer_lens.components import Attention, GroupedQueryAttention

    cfg = tl.HookedTransformerConfig(n_layers=1, d_model=16, d_head=4, n_ctx=16, d_vocab=13, attn_only=True,
                                     seed=0, **options)
    model = tl.HookedTransformer(cfg)
    tokens = torch.randint(0, 13, (2, 9))
    _, cache = model.run_with_cache(tokens)
    weights = {k: v for k, v in model.blocks[0].attn.state_dict().items()}
    if cfg.n_key_value_heads:
        attn = GroupedQueryAttention(cfg)
        weights = {("_" + k if k[2] in "KV" else k): v for k, v in weights.items()}
    else:
        attn = Attention(cfg)
    attn.load_state_dict(weights | {k: v for k, v in attn.state_dict().items() if k not in weights})
    x = cache["blocks.0.ln1.hook_normalized"]  # LN weights are 1 and biases 0 at init: the attention input
    with torch.no_grad():
        torch.testing.assert_close(attn(x, x, x), cache["blocks.0.hook_attn_out"], atol=1e-5, rtol=1e-5)
        entry = TransformerLensKeyValueCacheEntry.init_cache_entry(cfg, "cpu", batch_size=2)
        first = attn(x[:, :5], x[:, :5], x[:, :5], past_kv_cache_entry=entry)
        rest = attn(x[:, 5:], x[:, 5:], x[:, 5:], past_kv_cache_entry=entry)
    torch.testing.assert_close(torch.cat([first, rest], 1), cache["blocks.0.hook_attn_out"], atol=1e-5, rtol=1e-5)


def test_standalone_attention_masks_rebuilds_rotary_tables_and_refuses_bad_input(tl):
    from transformer_lens.components import Attention

    cfg = tl.HookedTransformerConfig(n_layers=1, d_model=8, d_head=4, n_ctx=4096, act_fn="relu",
                                     positional_embedding_type="rotary", window_size=2)
    attn = Attention(cfg, attn_type="local")
    assert attn.mask.shape == (0, 0) and attn.rotary_sin.shape == (2048, 4)
    legacy = attn.state_dict() | {"mask": torch.ones(4096, 4096, dtype=torch.bool)}
    attn.load_state_dict(legacy)  # TransformerLens' full mask from an old checkpoint: accepted, not kept
    assert attn.mask.shape == (0, 0)
    masked = attn.apply_causal_mask(torch.zeros(1, 1, 2, 4), past_kv_pos_offset=2,
                                    attention_mask=torch.tensor([[1, 0, 1, 1]]))
    assert torch.isfinite(masked[0, 0]).tolist() == [[False, False, True, False], [False, False, True, True]]
    attn.apply_rotary(torch.zeros(1, 1, 2, 4), past_kv_pos_offset=2048)
    assert attn.rotary_sin.shape == (4096, 4)  # doubled (up to n_ctx), not grown by one row
    with pytest.raises(ValueError, match="load_in_4bit=False"):
        Attention(tl.HookedTransformerConfig(n_layers=1, d_model=8, d_head=4, n_ctx=8, act_fn="relu", load_in_4bit=True))
    with pytest.raises(ValueError, match="need 5 keys, got 4"):
        attn.apply_causal_mask(torch.zeros(1, 1, 2, 4), past_kv_pos_offset=3)
    with pytest.raises(ValueError, match="use_logn_attn"):
        tl.HookedTransformer(tl.HookedTransformerConfig(n_layers=1, d_model=8, d_head=4, n_ctx=8, d_vocab=5,
                                                        act_fn="relu", use_logn_attn=True, train_seq_length=4))


def test_standalone_moe_mixes_the_top_experts_by_their_softmax(tl):
    from transformer_lens.components import MoE

    moe = MoE(dict(d_model=8, d_mlp=12, d_head=4, n_layers=1, n_ctx=4, num_experts=4, experts_per_token=2,
                   gated_mlp=True, act_fn="silu", seed=0))
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        out = moe(x)
        for b, p in [(0, 0), (1, 2)]:
            logits = x[b, p] @ moe.W_gate
            top = logits.topk(2)
            expected = sum(w * moe.experts[int(e)](x[b, p][None, None])[0, 0]
                           for w, e in zip(top.values.softmax(-1), top.indices))
            torch.testing.assert_close(out[b, p], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="experts_per_token"):
        MoE(dict(d_model=8, d_mlp=12, d_head=4, n_layers=1, n_ctx=4, num_experts=2, experts_per_token=3, act_fn="silu"))


def test_has_hooks_direction_error_legacy_import_warns_and_thin_svd(tl):
    import warnings

    from jaxtyping import TypeCheckError
    from transformer_lens import FactoredMatrix
    from transformer_lens.hook_points import HookPoint

    with pytest.raises(ValueError, match="dir must be"):
        HookPoint().has_hooks(dir="sideways")
    with pytest.raises(TypeCheckError):  # what TransformerLens' type-checked Literal raises
        HookPoint().has_hooks(dir="sideways")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from transformer_lens.hook_points import HookedRootModule
    assert HookedRootModule is hooked_attn.HookedRootModule
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    fm = FactoredMatrix(torch.randn(6, 7), torch.randn(7, 3))  # rank <= 3: the thin SVD has 3 columns
    U, S, V = fm.svd()
    assert (U.shape, S.shape, V.shape) == ((6, 3), (3,), (3, 3))
    torch.testing.assert_close(U @ torch.diag(S) @ V.T, fm.AB, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(U.T @ U, torch.eye(3), atol=1e-5, rtol=1e-5)


def test_d_vocab_out_sets_the_unembedding_width(tl):
    cfg = tl.HookedTransformerConfig(n_layers=1, d_model=8, d_head=4, n_ctx=6, act_fn="relu", d_vocab=20,
                                     d_vocab_out=7, seed=0)
    model = tl.HookedTransformer(cfg)
    logits, cache = model.run_with_cache(torch.randint(0, 20, (2, 5)))
    assert logits.shape == (2, 5, 7) and model.W_U.shape == (8, 7) and model.W_E.shape == (20, 8)
    assert model.W_U.std() > 0  # initialised with the rest of the model
    torch.testing.assert_close(logits, model.ln_final(cache["blocks.0.hook_resid_post"]) @ model.W_U + model.b_U)


def test_standalone_attention_refuses_inputs_of_another_width_before_computing(tl):
    from transformer_lens.components import Attention

    attn = Attention(tl.HookedTransformerConfig(n_layers=1, d_model=8, d_head=4, n_ctx=8, act_fn="relu"))
    seen = []
    attn.hook_q.add_hook(lambda x, hook: seen.append(x))
    good = torch.zeros(1, 3, 8)
    with pytest.raises(ValueError, match=r"key_input has shape \(1, 3, 7\): its last axis must be d_model=8"):
        attn(good, torch.zeros(1, 3, 7), good)
    assert seen == []  # refused before any projection ran
