"""Shared test fixtures: tolerances, tiny random HF models from the registry, real weights."""

import math
import os

import pytest
import torch
import transformers

from hooked_attn.architectures import REGISTRY
# The HF implementation the tests (and hooked-attn doctor) treat as ground truth, and why.
from hooked_attn.doctor import FALCON_EAGER_ADDS_ALIBI_TWICE, reference_attn_implementation  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()

# One tolerance table, keyed by what is compared (see STYLE.md 4.20).
TOL = {
    "tiny_fp32": dict(atol=1e-5, rtol=1e-5),
    "real_fp32": dict(atol=1e-4, rtol=0.0),  # the bound: max abs diff at most 1e-4
    # Real residual streams hold "massive activations" (|x| ~ 1e3 at the first position), where one
    # fp32 ulp is already ~1e-4, and deep layers drift by a few fp32 roundings between any two
    # implementations: compare at 1e-3 here and hold the error to HF's own fp32 error against
    # fp64 (test_real_weights.py), which is the real noise floor.
    "real_fp32_resid": dict(atol=1e-3, rtol=1e-5),
    # The same computation in float64 with and without an exact rewrite (weight processing): fp64's
    # rounding at these magnitudes (|x| < 1e2) is ~1e-14, and a wrong rewrite moves outputs by > 1e-3.
    "exact_fp64": dict(atol=1e-9, rtol=0.0),
}


def fp32_ulp(magnitude: float) -> float:
    """The spacing of float32 numbers at ``magnitude``: one unit in the last place."""
    return torch.finfo(torch.float32).eps * 2.0 ** math.floor(math.log2(max(magnitude, 2.0**-126)))


def assert_at_fp32_noise(ours: torch.Tensor, truth: torch.Tensor, reference: torch.Tensor, n_ulps: int = 4) -> None:
    """``ours`` (fp32) is no further from the fp64 ``truth`` than twice another fp32 computation of it
    (``reference``: HF fp32, or our unprocessed model) plus ``n_ulps`` roundings at the output's
    magnitude. The yardstick is fp32's own error on this very input: any two fp32 implementations
    that round in a different order differ by about that much, so a fixed atol passes or fails by luck
    of the BLAS path; a real mistake is orders of magnitude larger. The ulp term covers a reference
    that happens to round exactly."""
    floor = (reference.double() - truth).abs().max().item()
    err = (ours.double() - truth).abs().max().item()
    bound = 2 * floor + n_ulps * fp32_ulp(truth.abs().max().item())
    assert err <= bound, f"error to fp64 {err:.3e} > 2 x fp32 reference's {floor:.3e} + {n_ulps} ulp = {bound:.3e}"

CASES = [(arch, name, cfg) for arch in REGISTRY.values() if arch.kind == "decoder"
         for name, cfg in arch.tiny_hf_configs().items()]
CASE_IDS = [f"{arch.hf_architecture}-{name}" for arch, name, _ in CASES]


def randomize_(model: torch.nn.Module, seed: int = 0, biases: bool = True) -> torch.nn.Module:
    """Give every parameter random values (HF initialises biases to 0 and norm gains to 1, which
    would let a converter that drops them pass). Norm gains are drawn around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            is_gain = p.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight")
            if name.endswith("bias") and not biases:
                p.zero_()
            else:
                p.copy_(noise + (1.0 if is_gain else 0.0))
    return model


def tiny_hf_model(hf_cfg: transformers.PretrainedConfig, seed: int = 0, biases: bool = True) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_cfg, attn_implementation=reference_attn_implementation(hf_cfg)).eval()
    return randomize_(model, seed, biases)


def random_tokens(hf_cfg: transformers.PretrainedConfig, batch: int = 2, n_pos: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, hf_cfg.vocab_size, (batch, n_pos), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request):
    """(architecture record, variant name, HF config) for every registered variant."""
    return request.param


@pytest.fixture
def tl():
    """hooked_attn installed as ``transformer_lens`` for one test; the modules it replaced are put back."""
    import sys

    import hooked_attn

    saved = {k: v for k, v in sys.modules.items() if k == "transformer_lens" or k.startswith("transformer_lens.")}
    hooked_attn.install_as_transformer_lens()
    import transformer_lens

    yield transformer_lens
    for k in [k for k in sys.modules if k == "transformer_lens" or k.startswith("transformer_lens.")]:
        del sys.modules[k]
    sys.modules.update(saved)
