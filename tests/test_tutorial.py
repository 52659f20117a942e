"""The worked example (scripts/tutorial_factual_recall.py) runs on the real weights and its numbers hold."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_weights
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "tutorial_factual_recall.py"


@pytest.fixture(scope="module")
def findings(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("tutorial", SCRIPT)
    tutorial = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tutorial)
    out = tmp_path_factory.mktemp("tutorial")
    return tutorial.run(out), out


def test_the_prompts_disagree_the_way_the_tutorial_says(findings):
    f, _ = findings
    assert f["clean_logit_diff"] > 2 and f["corrupted_logit_diff"] < -2


def test_direct_logit_attribution_accounts_for_the_whole_logit_difference(findings):
    f, _ = findings
    assert f["dla_sum"] == pytest.approx(f["clean_logit_diff"], abs=1e-3)
    assert f["logit_lens_diff"][-1] == pytest.approx(f["clean_logit_diff"], abs=1e-3)


def test_activation_patching_exact_cases(findings):
    f, _ = findings
    resid = f["resid_pre_patching"]
    assert resid[0][3] == pytest.approx(1.0, abs=1e-4)  # layer 0, the country: the clean input itself
    assert all(abs(v) < 1e-4 for row in resid for v in row[:3])  # before the country nothing differs
    assert 0 < f["last_layer_where_the_country_position_carries_the_answer"] < len(resid) - 1


def test_attribution_patching_agrees_with_activation_patching(findings):
    f, out = findings
    for site, corr in f["attribution_vs_activation_patching_correlation"].items():
        assert corr > 0.9, site
    assert (out / "findings.json").is_file() and (out / "activation_patching.png").is_file()
