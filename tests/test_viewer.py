"""The HTML attention viewer, in a real headless browser (Debian's chromium driven by playwright): the page
loads from a file with no network request, its controls switch layer and head, and the weights it shows
are the tensor's. scripts/setup.sh installs chromium; a missing browser is a failure, not a skip."""

import html
import re
from pathlib import Path

import pytest
import torch

from conftest import tiny_hf_model
from hooked_attn import HookedTransformer
from hooked_attn import analysis as A
from hooked_attn.architectures import REGISTRY

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# A token that would end the page's <script> if it were pasted in raw, one with a space, one not ASCII.
TOKENS = ["<s>", "The", " cat", "</script><b>x", " sat", "é", " on", "."]


@pytest.fixture(scope="module")
def run():
    """(patterns [layer batch head q_pos k_pos], a viewer of sequence 1) from a tiny random LLaMA."""
    hf = tiny_hf_model(REGISTRY["LlamaForCausalLM"].tiny_hf_configs()["gqa"])
    model = HookedTransformer.from_pretrained_no_processing(hf)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, len(TOKENS)), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    return A.stack_patterns(cache), A.attention_viewer(cache, TOKENS, batch=1, top_k=3)


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh (it installs Debian's chromium for this test)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: run scripts/setup.sh (it installs the `test` extra)")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1100, "height": 900})
        yield context
        context.close()


@pytest.fixture
def page(run, browser_context, tmp_path):
    """The viewer opened from a file; every request other than the file itself is blocked and recorded."""
    _, viewer = run
    url = viewer.save(tmp_path / "viewer.html").resolve().as_uri()
    requests, blocked, errors = [], [], []

    def guard(route):
        if route.request.url == url:
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    browser_context.route("**/*", guard)
    page = browser_context.new_page()
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=10_000)
    yield page
    page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)
    page.close()
    browser_context.unroute("**/*")
    assert requests == [url], f"the page made requests besides loading itself: {requests}"
    assert blocked == [] and errors == [], (blocked, errors)


def weights(page, selector: str) -> dict[int, float]:
    """{position: weight} of the elements under ``selector`` that show one (not masked)."""
    return {int(pos): float(weight) for pos, weight in page.eval_on_selector_all(
        selector, "els => els.filter(e => e.dataset.weight !== undefined).map(e => [e.dataset.pos, e.dataset.weight])")}


def test_loads_offline_and_shows_the_last_token(page, run):
    stack, _ = run
    assert page.title().startswith("attention: ")
    assert page.locator("#tokens-to .tok").count() == len(TOKENS)
    texts = page.eval_on_selector_all("#tokens-to .tok", "els => els.map(e => e.firstChild.textContent)")
    assert texts == ["<s>", "The", "␣cat", "</script><b>x", "␣sat", "é", "␣on", "."]
    assert page.locator("#layer option").all_text_contents() == ["0", "1"]
    assert page.locator("#head option").all_text_contents() == ["0", "1", "2", "3", "mean"]
    # Layer 0, head 0, the last token in focus: its row of the pattern, every key attendable.
    shown = weights(page, "#tokens-to .tok")
    expected = stack[0, 1, 0, -1]
    assert sorted(shown) == list(range(len(TOKENS)))
    torch.testing.assert_close(torch.tensor([shown[k] for k in range(len(TOKENS))]), expected, atol=1e-7, rtol=0)


def test_controls_switch_layer_and_head(page, run):
    stack, _ = run
    page.select_option("#layer", "1")
    page.select_option("#head", "2")
    page.hover("#tokens-to .tok[data-pos='3']")
    assert page.text_content("#focus-to") == '3 "</script><b>x"'
    assert page.text_content("#grid-name") == "layer 1, head 2"
    row = stack[1, 1, 2, 3]  # layer 1, sequence 1, head 2, query 3
    shown = weights(page, "#tokens-to .tok")
    assert sorted(shown) == [0, 1, 2, 3]  # keys 4.. are in the future
    assert page.locator("#tokens-to .tok.masked").count() == len(TOKENS) - 4
    torch.testing.assert_close(torch.tensor([shown[k] for k in range(4)]), row[:4], atol=1e-7, rtol=0)
    # The top keys, heaviest first, with their weights printed to 4 decimals.
    top = page.locator("#topk-to li")
    assert top.count() == 3
    values, positions = row.topk(3)
    assert [int(p) for p in top.evaluate_all("els => els.map(e => e.dataset.pos)")] == positions.tolist()
    for text, position, value in zip(top.all_text_contents(), positions.tolist(), values.tolist()):
        assert text.startswith(f"{position} ") and text.endswith(f" {value:.4f}")
    # What attends to token 3: column 3 of the queries at or after it.
    column = weights(page, "#tokens-from .tok")
    assert sorted(column) == list(range(3, len(TOKENS)))
    torch.testing.assert_close(torch.tensor([column[q] for q in range(3, len(TOKENS))]), stack[1, 1, 2, 3:, 3],
                               atol=1e-7, rtol=0)

    page.select_option("#head", "0")
    torch.testing.assert_close(torch.tensor(list(weights(page, "#tokens-to .tok").values())), stack[1, 1, 0, 3, :4],
                               atol=1e-7, rtol=0)
    page.select_option("#head", "mean")
    assert page.text_content("#grid-name") == "layer 1, mean of heads"
    torch.testing.assert_close(torch.tensor(list(weights(page, "#tokens-to .tok").values())),
                               stack[1, 1, :, 3, :4].mean(0), atol=1e-6, rtol=0)


def test_pinning_and_top_k(page, run):
    stack, _ = run
    page.click("#tokens-to .tok[data-pos='5']")  # pin token 5
    page.hover("#tokens-from .tok[data-pos='2']")  # hovering elsewhere does not move a pinned focus
    assert page.text_content("#focus-to") == '5 "é"'
    page.fill("#topk", "6")
    page.press("#topk", "Enter")
    assert page.locator("#topk-to li").count() == 6
    assert page.locator("#topk-from li").count() == len(TOKENS) - 5
    page.click("#tokens-to .tok[data-pos='5']")  # unpin
    page.hover("#tokens-from .tok[data-pos='2']")
    assert page.text_content("#focus-to") == '2 "␣cat"'.replace("␣", " ")
    torch.testing.assert_close(torch.tensor(list(weights(page, "#tokens-to .tok").values())), stack[0, 1, 0, 2, :3],
                               atol=1e-7, rtol=0)


def test_the_request_guard_sees_a_page_that_loads_something(run, browser_context, tmp_path):
    """The control for the offline check: a page that does ask for an image is seen asking."""
    _, viewer = run
    leaky = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", viewer.html)
    leaky = leaky.replace("<body>", '<body><img src="http://127.0.0.1:9/pixel.png">')
    url = (tmp_path / "leaky.html").resolve().as_uri()
    (tmp_path / "leaky.html").write_text(leaky, encoding="utf-8")
    requests = []
    browser_context.route("**/*", lambda route: route.continue_() if route.request.url == url else route.abort())
    page = browser_context.new_page()
    page.on("request", lambda request: requests.append(request.url))
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=10_000)
    page.close()
    browser_context.unroute("**/*")
    assert requests == [url, "http://127.0.0.1:9/pixel.png"]


def test_inline_view_renders_inside_its_iframe(run, browser_context, tmp_path):
    """What Jupyter shows (``_repr_html_``), twice in one host page: each iframe runs its own viewer."""
    stack, viewer = run
    host = tmp_path / "notebook.html"
    host.write_text(f"<!DOCTYPE html><html><body>{viewer._repr_html_()}{viewer._repr_html_()}</body></html>",
                    encoding="utf-8")
    url = host.resolve().as_uri()
    requests = []
    page = browser_context.new_page()
    page.on("request", lambda request: requests.append(request.url))
    page.goto(url)
    frames = page.frame_locator("iframe")
    for index in range(2):
        frame = frames.nth(index)
        frame.locator("body[data-ready='1']").wait_for(timeout=10_000)
        assert frame.locator("#tokens-to .tok").count() == len(TOKENS)
    second = frames.nth(1)
    second.locator("#head").select_option("3")
    second.locator("#tokens-to .tok[data-pos='4']").hover()
    shown = second.locator("#tokens-to .tok[data-weight]").evaluate_all("els => els.map(e => +e.dataset.weight)")
    torch.testing.assert_close(torch.tensor(shown), stack[0, 1, 3, 4, :5], atol=1e-7, rtol=0)
    assert frames.nth(0).locator("#head").input_value() == "0"  # the other viewer is untouched
    page.close()
    assert requests == [url]


def test_page_is_self_contained(run):
    _, viewer = run
    page = viewer.html
    assert not re.search(r"(?i)\b(src|href)\s*=", page)  # nothing to fetch
    assert "http://" not in page and "https://" not in page
    assert "default-src 'none'" in page  # the Content-Security-Policy forbids loading anything
    assert page.count("</script>") == 2  # the data and the code; the token's "</script>" is escaped
    inline = viewer._repr_html_()
    assert inline.startswith("<iframe srcdoc=\"") and html.unescape(inline.split('"')[1]) == page


def test_viewer_arguments(run):
    stack, _ = run
    with pytest.raises(ValueError, match=r"str_tokens has 2 tokens but the patterns have k_pos=8 keys"):
        A.attention_viewer(stack, ["a", "b"])
    with pytest.raises(ValueError, match=r"a cache or a \[layer batch head q_pos k_pos\] stack, got shape"):
        A.attention_viewer(stack[0], TOKENS)
    with pytest.raises(ValueError, match="batch=2 is out of range"):
        A.attention_viewer(stack, TOKENS, batch=2)
    with pytest.raises(ValueError, match="layers names 1 layers but the stack holds 2"):
        A.attention_viewer(stack, TOKENS, layers=[3])
    viewer = A.attention_viewer(stack, TOKENS, layers=[5, 7], title="t")
    assert repr(viewer) == "AttentionViewer('t': 2 layers, 4 heads, 8 tokens)"
    assert '"layers": [5, 7]' in viewer.html
