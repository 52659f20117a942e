"""``hooked-attn doctor``: every registered family's tiny configs converted under the installed torch and
transformers, and compared with the HF model, one row per family and variant.

What a user runs after upgrading transformers, and what a bug report should paste: a release that
renames or adds a config field shows up as a refusal (with the converter's reason), one that changes
what a model computes as a difference.
"""

import copy
import dataclasses
import logging
from collections.abc import Iterable
from typing import Literal

import torch
import transformers
from packaging.version import Version
from transformers import PretrainedConfig

from hooked_attn.architectures import REGISTRY
from hooked_attn.architectures.base import (
    Architecture, StateDictError, UnknownArchitectureError, UnsupportedConfigError,
)

# The fp32 agreement a tiny random model must reach: their own fp32 rounding error is ~1e-5 (about ten
# ulps of logits ~8; tests/test_processing.py measures it against fp64), and a conversion mistake moves
# logits by 1e-2 or more.
AGREEMENT = 1e-4
# FalconAttention's eager branch adds the ALiBi bias twice before transformers 5.25 (see below).
FALCON_EAGER_ADDS_ALIBI_TWICE = Version(transformers.__version__) < Version("5.25")
Status = Literal["ok", "differs", "refused", "error"]
REFUSALS = (UnsupportedConfigError, StateDictError, UnknownArchitectureError)


def reference_attn_implementation(hf_cfg: PretrainedConfig) -> str:
    """The HF attention implementation the tests treat as ground truth: eager, except where
    transformers' eager path computes something its other paths and the original model do not.

    Falcon with alibi=True: FalconModel.forward folds ``alibi / sqrt(d_head)`` into the causal mask
    it hands every layer, and FalconAttention's eager branch then also adds ``alibi`` to q.k itself,
    so eager scores are ``(q.k + alibi) / sqrt(d_head) + alibi / sqrt(d_head)``: the bias twice.
    The sdpa branch (Falcon's default implementation) and the original Falcon-RW code add it once.
    ``tests/test_equivalence.py::test_falcon_alibi_hf_eager_adds_the_bias_twice`` checks this is still so.
    transformers 5.25 rewrote FalconAttention onto the shared attention interface, which adds the bias
    once (through the mask) in every implementation: from then on eager is the reference here too.
    """
    if hf_cfg.model_type == "falcon" and getattr(hf_cfg, "alibi", False) and FALCON_EAGER_ADDS_ALIBI_TWICE:
        return "sdpa"
    return "eager"


@dataclasses.dataclass(frozen=True)
class DoctorRow:
    """One family variant: max |ours - HF| over logits (unprocessed) and log-probs (processed), or why not."""

    family: str
    variant: str
    status: Status
    unprocessed: float | None = None
    processed: float | None = None
    reason: str = ""


def _randomized(hf: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (HF initialises biases to 0 and norm gains to 1, which would hide a
    converter that drops them); 1-d weights of norms are drawn around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            is_gain = p.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if is_gain else 0.0))
    return hf


@torch.no_grad()
def check_variant(arch: Architecture, variant: str, hf_cfg: PretrainedConfig, seed: int = 0) -> DoctorRow:
    """Convert one tiny config's random HF model (with and without weight processing) and compare."""
    from hooked_attn.encoder import HookedEncoder
    from hooked_attn.model import HookedTransformer

    row = DoctorRow(family=arch.hf_architecture, variant=variant, status="ok")
    try:
        torch.manual_seed(seed)
        if arch.kind == "encoder":
            hf = _randomized(getattr(transformers, arch.hf_architecture)(hf_cfg).eval(), seed)
        else:
            hf = _randomized(transformers.AutoModelForCausalLM.from_config(
                copy.deepcopy(hf_cfg), attn_implementation=reference_attn_implementation(hf_cfg)).eval(), seed)
        tokens = torch.randint(0, hf_cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed + 1))
        out = hf(tokens)
        ref = out.logits if hasattr(out, "logits") else out.last_hidden_state
        if arch.kind == "encoder":
            raw = HookedEncoder.from_pretrained(hf, center_unembed=False, fold_value_biases=False)(tokens)
            done = HookedEncoder.from_pretrained(hf)(tokens)
        else:
            raw = HookedTransformer.from_pretrained_no_processing(hf)(tokens)
            done = HookedTransformer.from_pretrained(hf)(tokens)
    except REFUSALS as err:
        return dataclasses.replace(row, status="refused", reason=" ".join(str(err).split()))
    except Exception as err:  # noqa: BLE001 - a doctor reports every failure as a row, and goes on
        return dataclasses.replace(row, status="error", reason=f"{type(err).__name__}: {' '.join(str(err).split())}")
    unprocessed = (raw - ref).abs().max().item()
    # Log-probs where there are logits (processing may shift logits by a per-position constant);
    # hidden states (a BertModel without a head) compare as they are.
    same = (lambda x: x.log_softmax(-1)) if hasattr(out, "logits") else (lambda x: x)
    processed = (same(done) - same(ref)).abs().max().item()
    ok = unprocessed <= AGREEMENT and processed <= AGREEMENT
    return dataclasses.replace(row, status="ok" if ok else "differs", unprocessed=unprocessed, processed=processed)


def run_doctor(families: Iterable[str] | None = None) -> list[DoctorRow]:
    """One row per variant of each registered family (all of them, or those named in ``families``).

    Raises:
        UnknownArchitectureError: a name in ``families`` is not registered.
    """
    names = sorted(REGISTRY) if families is None else list(families)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise UnknownArchitectureError(f"{', '.join(unknown)} not registered; registered: {', '.join(sorted(REGISTRY))}")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    rows = []
    for name in names:
        arch = REGISTRY[name]
        try:
            variants = arch.tiny_hf_configs()
        except Exception as err:  # noqa: BLE001 - the installed transformers cannot build this family's configs
            rows.append(DoctorRow(family=name, variant="*", status="error",
                                  reason=f"tiny_hf_configs: {type(err).__name__}: {' '.join(str(err).split())}"))
            continue
        rows.extend(check_variant(arch, variant, cfg) for variant, cfg in variants.items())
    return rows


def format_rows(rows: list[DoctorRow]) -> str:
    """The table ``hooked-attn doctor`` prints: a header naming the versions, one line per row, a total."""
    lines = [f"hooked_attn doctor: torch {torch.__version__}, transformers {transformers.__version__}; "
             f"max |ours - HF| on tiny random fp32 models (ok <= {AGREEMENT:g})",
             f"{'family':<24} {'variant':<30} {'unprocessed':>11} {'processed':>10}  status"]
    for r in rows:
        nums = (f"{r.unprocessed:>11.1e} {r.processed:>10.1e}" if r.unprocessed is not None
                else f"{'-':>11} {'-':>10}")
        lines.append(f"{r.family:<24} {r.variant:<30} {nums}  {r.status}{': ' + r.reason if r.reason else ''}")
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "differs", "refused", "error")}
    lines.append(f"{len(rows)} variants: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)
