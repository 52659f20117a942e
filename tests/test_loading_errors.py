"""Loading refuses what it cannot honour with an error that names it, and leaves the caller's objects as they
were: the source model of release_source=True, weights another model shares, a non-finite weight,
an emptied source, and dtype / tokenizer / device arguments of the wrong kind (issue 18, loading cases)."""

import pytest
import torch
import transformers
from torch import nn

from hooked_attn import HookedTransformer, ProcessingError
from hooked_attn.loading import NonFiniteWeightError
from hooked_attn.sources import check_tokenizer_arg
from tests.conftest import tiny_hf_model

LLAMA = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=101, max_position_embeddings=32)
GPT2 = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=101)
TOKENS = torch.arange(12)[None] % 101


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_whole(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for key, tensor in after.items():
        assert not tensor.is_meta, key
        torch.testing.assert_close(tensor, before[key], rtol=0, atol=0, msg=key)


def test_release_source_keeps_the_source_whole_when_a_processing_step_is_refused():
    hf = tiny_hf_model(LLAMA)
    before = snapshot(hf)
    with pytest.raises(ProcessingError, match="refactor_factored_attn_matrices.*rotary"):
        HookedTransformer.from_pretrained(hf, release_source=True, refactor_factored_attn_matrices=True)
    assert_whole(hf, before)
    HookedTransformer.from_pretrained(hf, release_source=True)  # and it can still be loaded


def test_release_source_keeps_the_source_whole_when_the_device_is_unavailable():
    hf = tiny_hf_model(LLAMA)
    before = snapshot(hf)
    with pytest.raises(ValueError, match="cannot load onto device 'cuda:99'"):  # no machine has 100 GPUs
        HookedTransformer.from_pretrained(hf, release_source=True, device="cuda:99")
    assert_whole(hf, before)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cannot load onto device 'cuda'"):
            HookedTransformer.from_pretrained(hf, release_source=True, device="cuda")
        assert_whole(hf, before)


def test_release_source_never_rewrites_weights_another_model_shares():
    hf = tiny_hf_model(GPT2)
    other = transformers.AutoModelForCausalLM.from_config(GPT2).eval()
    other.load_state_dict(hf.state_dict(), assign=True)  # every weight shares the source's storage
    third = transformers.AutoModelForCausalLM.from_config(GPT2).eval()
    third.load_state_dict(snapshot(hf))
    third.transformer.h[0].mlp.c_fc.weight = hf.transformer.h[0].mlp.c_fc.weight  # the same Parameter object
    other_logits, third_logits = other(TOKENS).logits.detach(), third(TOKENS).logits.detach()
    expected = HookedTransformer.from_pretrained(hf)(TOKENS)
    taken = HookedTransformer.from_pretrained(hf, release_source=True)
    torch.testing.assert_close(taken(TOKENS), expected, rtol=0, atol=0)
    torch.testing.assert_close(other(TOKENS).logits, other_logits, rtol=0, atol=0)
    torch.testing.assert_close(third(TOKENS).logits, third_logits, rtol=0, atol=0)


def test_a_nan_in_an_unused_row_of_a_tied_embedding_is_named_before_processing_spreads_it():
    hf = tiny_hf_model(LLAMA.__class__(**{**LLAMA.to_dict(), "tie_word_embeddings": True}))
    with torch.no_grad():
        hf.model.embed_tokens.weight[57, 3] = float("nan")
    before = snapshot(hf)
    with pytest.raises(NonFiniteWeightError, match=r"'unembed\.W_U' \(32, 101\) holds 1 non-finite value\(s\); the "
                                                   r"first is nan at index \(3, 57\)\. Processing \(center_unembed\)"
                                                   r".*center_unembed=False, or from_pretrained_no_processing"):
        HookedTransformer.from_pretrained(hf, release_source=True)
    torch.testing.assert_close(hf.state_dict()["model.embed_tokens.weight"], before["model.embed_tokens.weight"],
                               rtol=0, atol=0, equal_nan=True)
    # Without centring the unembedding, the model computes what HF computes: one NaN column.
    for model in (HookedTransformer.from_pretrained_no_processing(hf),
                  HookedTransformer.from_pretrained(hf, center_unembed=False)):
        logits = model(TOKENS)
        assert logits[..., 57].isnan().all() and logits[..., :57].isfinite().all()
    torch.testing.assert_close(HookedTransformer.from_pretrained_no_processing(hf)(TOKENS), hf(TOKENS).logits,
                               rtol=1e-4, atol=1e-4, equal_nan=True)


def test_an_inf_made_by_the_dtype_is_named_too():
    hf = tiny_hf_model(GPT2)  # W_U tied to W_E
    with torch.no_grad():
        hf.transformer.wte.weight[7, 5] = 1e6  # finite in float32, inf in float16
    with pytest.raises(NonFiniteWeightError, match=r"'unembed\.W_U' \(32, 101\) holds 1 non-finite value\(s\) in "
                                                   r"torch\.float16; the first is inf at index \(5, 7\)"):
        HookedTransformer.from_pretrained(hf, dtype=torch.float16)


def test_a_bf16_model_loaded_by_default_is_upcast_with_a_warning():
    hf = tiny_hf_model(LLAMA).to(torch.bfloat16)
    with pytest.warns(UserWarning, match=r"torch\.bfloat16; loading them as torch\.float32.*dtype=torch\.bfloat16"):
        model = HookedTransformer.from_pretrained(hf)
    assert model.dtype == torch.float32
    with warnings_as_errors():
        kept = HookedTransformer.from_pretrained(hf, dtype=torch.bfloat16)
    assert kept.dtype == torch.bfloat16


def test_a_dtype_can_be_named_and_must_be_floating_point():
    hf = tiny_hf_model(GPT2)
    assert HookedTransformer.from_pretrained(hf, dtype="bfloat16").dtype == torch.bfloat16
    assert HookedTransformer.from_pretrained(hf, dtype="torch.float16").dtype == torch.float16
    with pytest.raises(ValueError, match="dtype must be a floating-point dtype .* got torch.int64"):
        HookedTransformer.from_pretrained(hf, dtype=torch.int64)
    with pytest.raises(ValueError, match="dtype 'bfloat17' is not a torch dtype"):
        HookedTransformer.from_pretrained(hf, dtype="bfloat17")


def test_loading_from_an_emptied_model_says_so():
    hf = tiny_hf_model(GPT2)
    HookedTransformer.from_pretrained(hf, release_source=True)
    with pytest.raises(ValueError, match="GPT2LMHeadModel has no weights: .* on the meta device .*release_source=True"):
        HookedTransformer.from_pretrained(hf)


def test_a_tokenizer_of_the_wrong_type_is_named():
    with pytest.raises(TypeError, match="tokenizer must be a PreTrainedTokenizerBase, a path or hub id, or None; got int"):
        check_tokenizer_arg(123)
    # Under the test suite's runtime type checks the signature refuses it first; either way the error
    # names the tokenizer argument, and nothing is loaded.
    with pytest.raises(TypeError, match="tokenizer"):
        HookedTransformer.from_pretrained(tiny_hf_model(GPT2), tokenizer=123)


def test_a_wrapped_models_cache_says_which_analyses_it_cannot_run():
    from hooked_attn import wrap

    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True).eval()
    wrapped = wrap(nn.Sequential(layer))
    _, cache = wrapped.run_with_cache(torch.randn(1, 5, 16))
    with pytest.raises(TypeError, match=r"needs a transformer model like HookedTransformer .* has no cfg, blocks, W_U"):
        cache.decompose_resid()


class warnings_as_errors:
    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc: object) -> None:
        self._catch.__exit__(*exc)


def test_the_encoder_shares_the_pipeline_release_source_included():
    from hooked_attn import HookedEncoder
    from hooked_attn.architectures.bert import tiny_hf_configs

    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(tiny_hf_configs()["default"]).eval()
    copied = HookedEncoder.from_pretrained(hf, dtype="float32")
    with pytest.raises(ValueError, match="cannot load onto device 'cuda:99'"):
        HookedEncoder.from_pretrained(hf, release_source=True, device="cuda:99")
    assert not any(p.is_meta for p in hf.parameters())
    taken = HookedEncoder.from_pretrained(hf, release_source=True)
    assert all(p.is_meta for p in hf.parameters())
    ids = torch.arange(10)[None]
    torch.testing.assert_close(taken(ids), copied(ids), rtol=0, atol=0)
