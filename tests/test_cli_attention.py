"""``hooked-attn attention`` on a tiny random LLaMA saved to a folder with a small word-level tokenizer:
the heatmap and top-k table show the model's own pattern, --png and --html write their files, and bad
arguments are one-line errors with exit status 2."""

import re

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import tiny_hf_model
from hooked_attn import HookedTransformer
from hooked_attn.architectures import REGISTRY
from hooked_attn.cli import _parser, main

WORDS = ["[UNK]", "<s>", "the", "cat", "sat", "on", "mat", "."]
TEXT = "the cat sat on the mat . the cat sat on the mat"


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over WORDS (ids 0..7, inside the tiny model's vocabulary)."""
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(a model folder with its tokenizer, the same model without one, a tokenizer-only folder)."""
    hf = tiny_hf_model(REGISTRY["LlamaForCausalLM"].tiny_hf_configs()["gqa"])
    with_tokenizer, bare, tokenizer = (tmp_path_factory.mktemp(name) for name in ("model", "bare", "tokenizer"))
    hf.save_pretrained(with_tokenizer)
    hf.save_pretrained(bare)
    word_tokenizer().save_pretrained(with_tokenizer)
    word_tokenizer().save_pretrained(tokenizer)
    return with_tokenizer, bare, tokenizer


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def expected_pattern(folder, layer: int, text: str = TEXT) -> torch.Tensor:
    """[head q_pos k_pos] of ``layer``, computed with the library directly."""
    model = HookedTransformer.from_pretrained_no_processing(folder)
    _, cache = model.run_with_cache(model.to_tokens(text))
    return cache["pattern", layer][0]


def heatmap_cells(out: str) -> dict[int, list[str]]:
    """{query position: its cells} from the plain heatmap the command prints."""
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if re.match(r"^ {0,2}\d+ \S", line))
    start = len(lines[first - 1]) - len(lines[first - 1].lstrip())
    rows = {}
    for line in lines[first:]:
        if not line.strip():
            break
        rows[int(line.split()[0])] = list(line[start::2])
    return rows


def test_one_positional_is_the_text():
    args = _parser().parse_args(["attention", "hello there"])
    assert args.model is None and args.text == "hello there"
    args = _parser().parse_args(["attention", "some/folder", "hello", "--layer", "2", "--head", "1"])
    assert (args.model, args.text, args.layer, args.head) == ("some/folder", "hello", 2, 1)


def test_heatmap_and_top_k_show_the_models_pattern(folders, capsys):
    folder, _, _ = folders
    code, out, err = run(capsys, "attention", str(folder), TEXT, "--layer", "1", "--head", "3", "--top-k", "4")
    assert code == 0, err
    assert "LlamaForCausalLM, 2 layers, 4 heads" in out
    assert f"{TEXT!r} (13 tokens)" in out
    assert "layer 1 head 3" in out
    pattern = expected_pattern(folder, 1)[3]
    cells = heatmap_cells(out)
    assert sorted(cells) == list(range(13))
    for q, row in cells.items():
        assert len(row) == q + 1  # the future is blank (and stripped)
        for k, cell in enumerate(row):
            tenths = min(9, int(float(pattern[q, k]) * 10 + 1e-5))
            assert cell == ("." if tenths == 0 else str(tenths)), (q, k)
    table = out[out.index("top 4 keys for query 12 'mat', head 3"):].splitlines()
    values, positions = pattern[12].topk(4)
    for line, position, value in zip(table[2:6], positions.tolist(), values.tolist()):
        _, pos, token, weight = line.split()
        assert int(pos) == position and token == TEXT.split()[position]
        assert float(weight) == pytest.approx(value, abs=5e-5)


def test_png_and_html(folders, tmp_path, capsys):
    folder, _, _ = folders
    png, html = tmp_path / "head.png", tmp_path / "viewer.html"
    code, out, err = run(capsys, "attention", str(folder), TEXT, "--query", "3", "--png", str(png),
                         "--html", str(html), "--all-heads", "--max-tokens", "6")
    assert code == 0, err
    assert f"wrote {png}" in out and f"wrote {html}" in out
    assert "showing the last 6 of 13 queries" in out
    assert "top 5 keys for query 3 'on', head 0" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and '"layers": [0, 1]' in page and '"n_heads": 4' in page


def test_a_tokenizer_from_elsewhere(folders, capsys):
    _, bare, tokenizer = folders
    code, _, err = run(capsys, "attention", str(bare), TEXT)
    assert code == 2 and err.startswith("error: ") and "has no tokenizer: pass --tokenizer PATH" in err
    code, out, err = run(capsys, "attention", str(bare), "the cat", "--tokenizer", str(tokenizer), "--prepend-bos")
    assert code == 0, err
    assert "'the cat' (3 tokens)" in out and "top 3 keys for query 2 'cat'" in out  # <s> first


@pytest.mark.parametrize(("argv", "message"), [
    (["--layer", "2"], "error: --layer 2 is out of range: the model has 2 layers (0..1)"),
    (["--head", "-5"], "error: --head -5 is out of range: the model has 4 heads per layer (0..3)"),
    (["--query", "13"], "error: --query 13 is out of range: the model has 13 tokens in TEXT (0..12)"),
    (["--png", "picture.jpg"], "error: --png 'picture.jpg': the file name must end in one of .png, .svg, .pdf"),
    (["--top-k", "0"], "error: --top-k and --max-tokens must be at least 1, got 0 and 40"),
])
def test_bad_arguments_are_one_line_errors(folders, capsys, argv, message):
    folder, _, _ = folders
    code, out, err = run(capsys, "attention", str(folder), TEXT, *argv)
    assert code == 2 and out == ""
    assert err == message + "\n"


def test_missing_model_folder(tmp_path, capsys):
    code, _, err = run(capsys, "attention", str(tmp_path / "nothing"), "text")
    assert code == 2 and err == f"error: no such folder or file: {str(tmp_path / 'nothing')!r}\n"


@pytest.mark.real_weights
def test_default_model(capsys, tmp_path):
    from hooked_attn.default_model import resolve_default_model

    text = "The cat sat on the mat. The cat sat on the mat."
    code, out, err = run(capsys, "attention", text, "--layer", "18", "--head", "6",  # no MODEL: the default
                         "--png", str(tmp_path / "a.png"))
    assert code == 0, err
    assert "LlamaForCausalLM, 30 layers, 9 heads" in out and "(14 tokens)" in out
    pattern = expected_pattern(resolve_default_model(), 18, text)[6]
    table = out[out.index("top 5 keys for query 13 '.', head 6"):].splitlines()
    values, positions = pattern[13].topk(5)
    for line, position, value in zip(table[2:7], positions.tolist(), values.tolist()):
        _, pos, _, weight = line.split()
        assert int(pos) == position and float(weight) == pytest.approx(value, abs=5e-5)
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
