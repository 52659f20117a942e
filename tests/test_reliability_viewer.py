"""The HTML viewer opens at the layer and head asked for (``hooked-attn attention --layer --head --html``,
``attention_viewer(layer=, head=)``), checked in Debian's chromium as in test_viewer.py (issue 18 case 9)."""

from pathlib import Path

import pytest
import torch

from conftest import tiny_hf_model
from hooked_attn import HookedTransformer
from hooked_attn import analysis as A
from hooked_attn.architectures import REGISTRY
from test_cli_attention import TEXT, folders, run  # noqa: F401 - the folders fixture
from test_viewer import CHROMIUM, CHROMIUM_FLAGS


def open_page(path: Path):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh")
    playwright = sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
    page = browser.new_page()
    page.goto(path.resolve().as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=10_000)
    return playwright, browser, page


def test_the_cli_viewer_opens_at_layer_and_head(folders, tmp_path, capsys):  # noqa: F811
    folder, _, _ = folders
    html = tmp_path / "viewer.html"
    code, _, err = run(capsys, "attention", str(folder), TEXT, "--layer", "1", "--head", "-1", "--html", str(html))
    assert code == 0, err
    playwright, browser, page = open_page(html)
    try:
        assert page.eval_on_selector("#layer", "e => e.value") == "1"
        assert page.eval_on_selector("#head", "e => e.value") == "3"
        assert page.text_content("#grid-name") == "layer 1, head 3"
    finally:
        browser.close()
        playwright.stop()


def test_attention_viewer_start_arguments_are_checked():
    hf = tiny_hf_model(REGISTRY["LlamaForCausalLM"].tiny_hf_configs()["gqa"])
    model = HookedTransformer.from_pretrained_no_processing(hf)
    _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]), names_filter=lambda n: n.endswith("hook_pattern"))
    assert '"start_layer": 1, "start_head": 2' in A.attention_viewer(cache, ["a", "b", "c"], layer=1, head=2).html
    with pytest.raises(ValueError, match=r"layer=5 is not among the viewer's layers \[0, 1\]"):
        A.attention_viewer(cache, ["a", "b", "c"], layer=5)
    with pytest.raises(ValueError, match=r"head=4 is out of range: heads has size 4"):
        A.attention_viewer(cache, ["a", "b", "c"], head=4)
