"""Write docs/architectures.md: every registered family, the variants its tests prove, the weight
processing it gets, and the hooks it adds — from the registry and a fresh run of the tests.

    python scripts/architectures_table.py            # runs the equivalence tests, then writes the page
    python scripts/architectures_table.py --no-tests # from the registry alone (results column "not run")
    python scripts/architectures_table.py --junitxml results.xml  # from an earlier run of the same tests

The processing and hook columns describe each family's first variant; a variant that differs is named
after it.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import transformers

from hooked_attn import HookedEncoder, HookedTransformer
from hooked_attn.architectures import by_kind
from hooked_attn.processing import STEPS, why_not

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_equivalence.py", "tests/test_processing.py", "tests/test_hooks.py", "tests/test_encoder.py"]
BASE_HOOKS = {"hook_embed", "hook_pos_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
              "hook_mlp_out", "ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale", "ln2.hook_normalized",
              "ln_final.hook_scale", "ln_final.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
              "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result", "mlp.hook_pre",
              "mlp.hook_post"}


def run_tests() -> dict[str, dict[str, str]]:
    """{architecture: {variant: "proven" | "FAILED"}} from the registry-parametrised tests."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "results.xml"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *TESTS],
                       cwd=ROOT, env=env, check=False, stdout=subprocess.DEVNULL)
        return read_results(xml)


def read_results(xml: Path) -> dict[str, dict[str, str]]:
    """{architecture: {variant: "proven" | "FAILED"}} from a JUnit XML file of a run of TESTS."""
    results: dict[str, dict[str, str]] = defaultdict(dict)
    cases = list(ET.parse(xml).getroot().iter("testcase"))
    classnames = {case.get("classname", "") + "." for case in cases}  # "tests.test_equivalence" (+ ".Class")
    missing = [t for t in TESTS if not any(c.startswith(t.removesuffix(".py").replace("/", ".") + ".")
                                           for c in classnames)]
    if missing:
        raise SystemExit(f"{xml} has no results from {', '.join(missing)}: run all of {' '.join(TESTS)}")
    for case in cases:
        match = re.search(r"\[([A-Za-z0-9]+(?:ForCausalLM|LMHeadModel))-([^\]-]+)", case.get("name", ""))
        if not match:
            continue
        arch, variant = match.groups()
        failed = case.find("failure") is not None or case.find("error") is not None
        if failed or results[arch].get(variant) != "FAILED":
            results[arch][variant] = "FAILED" if failed else "proven"
    return results


def family_hooks(model: HookedTransformer | HookedEncoder) -> list[str]:
    """Hook sites this family has beyond the shared vocabulary, with block indices dropped."""
    sites = {re.sub(r"^blocks\.\d+\.", "", name) for name in model.hook_dict}
    return sorted(sites - BASE_HOOKS)


def step_status(step: str, cfg) -> str:
    reason = why_not(step, cfg)
    if step == "refactor_factored_attn_matrices":
        return f"refused ({reason})" if reason else "available (opt-in)"
    return f"skipped ({reason})" if reason else "applied"


def per_variant(values: dict[str, str], fmt) -> str:
    """The first variant's value, then each variant whose value differs, by name."""
    first, *rest = values.items()
    others = [f"{variant}: {value}" for variant, value in rest if value != first[1]]
    return fmt(first[1]) + (f" ({'; '.join(others)})" if others else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-tests", action="store_true")
    parser.add_argument("--junitxml", type=Path, help="read the results of an earlier run of the tests from here")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "architectures.md")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    results = {} if args.no_tests else read_results(args.junitxml) if args.junitxml else run_tests()
    rows = []
    for name, arch in sorted(by_kind("decoder").items()):
        variants = arch.tiny_hf_configs()
        cfgs = {v: arch.config_from_hf(hf_cfg) for v, hf_cfg in variants.items()}
        proven = [f"{v} ({results.get(name, {}).get(v, 'not run')})" for v in variants]
        steps = [per_variant({v: step_status(s, cfg) for v, cfg in cfgs.items()}, lambda x, s=s: f"{s}: {x}")
                 for s in STEPS]
        # Hook names need the modules only, not weights: an unloaded model of each variant's config.
        hooks = {v: family_hooks(HookedTransformer(cfg)) for v, cfg in cfgs.items()}
        first = next(iter(hooks.values()))
        extra = [f"`{h}` ({v})" for v, found in hooks.items() for h in found if h not in first]
        rows.append((name, proven, steps, [f"`{h}`" for h in first] + extra))
    for name, arch in sorted(by_kind("encoder").items()):
        variants = arch.tiny_hf_configs()
        default = next(iter(variants.values()))
        hf_cls = getattr(transformers, name)
        model = HookedEncoder.from_pretrained(hf_cls(default))
        steps = ["fold_value_biases: applied", "center_unembed: applied with a masked-LM head",
                 f"fold_ln, center_writing_weights: skipped ({why_not('fold_ln', model.cfg)})"]
        rows.append((f"{name} (HookedEncoder)", [f"{v} (see tests/test_encoder.py)" for v in variants], steps,
                     [f"`{h}`" for h in family_hooks(model)]))
    lines = [
        "# Architectures",
        "",
        "Generated by `python scripts/architectures_table.py` from the registry and a run of the",
        "registry-parametrised tests (tests/test_equivalence.py, test_processing.py, test_hooks.py). A variant is",
        "*proven* when its unprocessed logits and every `hook_resid_pre` equal HF's (fp32), its processed",
        "log-probs equal HF's, each processing step keeps its invariant, and every hook fires with its shape.",
        "HF's reference is its eager attention, except where `tests/conftest.py::reference_attn_implementation`",
        "says why another is right (Falcon with ALiBi: sdpa). Weight processing and hooks are those of the first",
        "variant; a variant that differs is named in brackets. Do not edit by hand.",
        "",
        "| HF architecture | variants (tiny random models) | weight processing | hooks beyond the shared vocabulary |",
        "|---|---|---|---|",
    ]
    for name, proven, steps, hooks in rows:
        lines.append(f"| `{name}` | {'<br>'.join(proven)} | {'<br>'.join(steps)} | {'<br>'.join(hooks) or '-'} |")
    lines += ["", "The shared vocabulary is in [conventions.md](conventions.md#hook-points).", ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out} ({len(rows)} architectures)")


if __name__ == "__main__":
    main()
