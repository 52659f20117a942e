"""The ``hooked-attn`` command on tiny random models saved to folders: the verify table and its JSON,
exit codes, one-line errors, and the hook listing with shapes that match the axis glossary."""

import json
import re

import pytest
import torch
import transformers

from conftest import TOL, tiny_hf_model
from hooked_attn import HookedTransformer
from hooked_attn.architectures import REGISTRY
from hooked_attn.cli import main
from hooked_attn.verify import N_RANDOM_TOKENS, verify_model

TINY = {"gpt2": ("GPT2LMHeadModel", "default"), "llama": ("LlamaForCausalLM", "gqa")}
ROW = re.compile(r"^(unprocessed|processed)\s+(\S+)\s+(\S+)\s+[\d.]+ s\s+[\d.]+ ms\s+(\d+)(.*)$", re.M)
RESID = re.compile(r"^\s+blocks\.(\d+)\.hook_resid_pre\s+(\S+)\s+\S+$", re.M)


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, tmp_path_factory):
    """(folder holding a saved tiny random model, the same HF model in memory)."""
    arch, variant = TINY[request.param]
    hf = tiny_hf_model(REGISTRY[arch].tiny_hf_configs()[variant])
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return folder, hf


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_table(tiny, capsys):
    folder, hf = tiny
    code, out, _ = run(capsys, "verify", str(folder))
    assert code == 0, out
    n_hooks = len(HookedTransformer.from_pretrained_no_processing(folder).hook_dict)
    assert f"{hf.config.num_hidden_layers} layers, {n_hooks} hook points, float32" in out
    assert f"{N_RANDOM_TOKENS} fixed random token ids (the model has no tokenizer)" in out
    rows = {name: (float(logit), float(log_prob), int(token), rest) for name, logit, log_prob, token, rest
            in ROW.findall(out)}
    assert set(rows) == {"unprocessed", "processed"}
    unprocessed, processed = rows["unprocessed"], rows["processed"]
    assert unprocessed[0] <= TOL["tiny_fp32"]["atol"] and unprocessed[1] <= TOL["tiny_fp32"]["atol"]
    assert processed[1] <= TOL["tiny_fp32"]["atol"]  # processed logits may shift by a constant; log-probs not
    assert "DIFFERS" not in unprocessed[3] + processed[3]
    resid = RESID.findall(out)
    assert [int(layer) for layer, _ in resid] == list(range(hf.config.num_hidden_layers))
    assert all(float(diff) <= TOL["tiny_fp32"]["atol"] for _, diff in resid)
    assert out.rstrip().splitlines()[-1].startswith("PASS")


def test_verify_json_matches_hf(tiny, capsys):
    folder, hf = tiny
    code, out, _ = run(capsys, "verify", str(folder), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["passed"] is True and report["failures"] == []
    assert report["prompt"] is None and len(report["token_ids"]) == N_RANDOM_TOKENS
    assert len(report["resid_diffs"]) == hf.config.num_hidden_layers
    with torch.no_grad():
        expected = int(hf(torch.tensor([report["token_ids"]])).logits[0, -1].argmax())
    for run_name in ("hf", "unprocessed", "processed"):
        assert report[run_name]["next_token"] == {"id": expected, "text": None}
    assert report["unprocessed"]["max_logit_diff"] <= TOL["tiny_fp32"]["atol"]


def test_verify_exits_1_over_tolerance(tiny, capsys):
    folder, _ = tiny
    # Weight processing reorders float operations, so the processed log-probs never match to 1e-12.
    code, out, _ = run(capsys, "verify", str(folder), "--atol", "1e-12")
    assert code == 1
    assert out.rstrip().splitlines()[-1].startswith("FAIL (atol 1e-12): ")
    assert "processed max |log-prob diff|" in out


def test_verify_report_from_the_library(tiny):
    folder, hf = tiny
    report = verify_model(folder)
    assert report.hf_architecture == type(hf).__name__
    assert report.failures() == []
    assert len(report.failures(atol=1e-12)) >= 1


@pytest.mark.parametrize("command", ["verify", "hooks"])
def test_missing_folder_is_a_one_line_error(command, tmp_path, capsys):
    code, out, err = run(capsys, command, str(tmp_path / "no_such_model"))
    assert code == 2 and out == ""
    assert err == f"error: no such folder or file: {str(tmp_path / 'no_such_model')!r}\n"


def test_folder_without_config_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run(capsys, "verify", str(tmp_path))
    assert code == 2
    assert err.startswith("error: ") and "has no config.json" in err and err.count("\n") == 1


def test_unreachable_hub_id_is_a_one_line_error(capsys):
    code, _, err = run(capsys, "hooks", "no-such-org/no-such-model")
    assert code == 2
    assert err.startswith("error: 'no-such-org/no-such-model' is not a local folder or file")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_unknown_architecture_is_a_one_line_error(tmp_path, capsys):
    # A state-space model: not a transformer, so never in the registry.
    cfg = transformers.MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, state_size=4)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    capsys.readouterr()  # drop save_pretrained's progress bar
    code, _, err = run(capsys, "verify", str(tmp_path))
    assert code == 2
    assert err.startswith("error: architecture 'MambaForCausalLM'") and "supported: " in err
    assert err.count("\n") == 1


def test_usage_errors_exit_2(capsys):
    assert run(capsys, "verify", "--dtype", "float16")[0] == 2
    assert run(capsys)[0] == 2


def parse_hooks(out: str) -> tuple[dict[str, int], dict[str, tuple[tuple[int, ...], str]]]:
    """(axis sizes from the header, {name: (shape, axes)}) from the hooks listing."""
    lines = out.splitlines()
    header = [line for line in lines if line.startswith("#")]
    sizes = {axis: int(size) for axis, size in re.findall(r"(\w+)=(\d+)", header[-1])}
    hooks = {}
    for line in lines:
        if not line.startswith("#"):
            name, shape, axes = re.fullmatch(r"(\S+)\s+(\([\d, ]+\))\s+(.+)", line).groups()
            hooks[name] = (tuple(int(d) for d in shape.strip("()").split(",") if d.strip()), axes)
    return sizes, hooks


def test_hooks_lists_every_hook_with_glossary_shapes(tiny, capsys):
    folder, _ = tiny
    code, out, _ = run(capsys, "hooks", str(folder))
    assert code == 0
    model = HookedTransformer.from_pretrained(folder)
    sizes, hooks = parse_hooks(out)
    assert list(hooks) == list(model.hook_dict)
    assert f": {len(model.hook_dict)} hook points" in out.splitlines()[0]
    sizes["1"] = 1
    for name, (shape, axes) in hooks.items():
        assert shape == tuple(sizes[axis] for axis in axes.split()), name


def test_hooks_filter_lists_exactly_the_patterns(tiny, capsys):
    folder, hf = tiny
    code, out, _ = run(capsys, "hooks", str(folder), "--filter", "pattern")
    assert code == 0
    sizes, hooks = parse_hooks(out)
    n_layers, n_heads = hf.config.num_hidden_layers, hf.config.num_attention_heads
    assert list(hooks) == [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    n_pos = sizes["pos"]
    assert n_pos > 1 and n_pos != n_heads  # so a transposed shape could not pass
    assert set(hooks.values()) == {((1, n_heads, n_pos, n_pos), "batch head q_pos k_pos")}


def test_hooks_filter_matching_nothing_exits_1(tiny, capsys):
    folder, _ = tiny
    code, _, err = run(capsys, "hooks", str(folder), "--filter", "no_such_hook")
    assert code == 1 and "no hook name contains 'no_such_hook'" in err


@pytest.mark.real_weights
def test_verify_default_model_predicts_paris(capsys):
    code, out, _ = run(capsys, "verify")  # scripts/setup.sh installs the default model: missing is a failure
    assert code == 0, out
    assert "' Paris'" in out
    hf_row = next(line for line in out.splitlines() if line.startswith("HF eager"))
    assert "' Paris'" in hf_row
