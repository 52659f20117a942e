"""Every ```python block in docs/ runs: each page's blocks execute in order, sharing one namespace.

Running documentation is the one place this suite uses ``exec`` (STYLE.md section 5 lists it as an
anti-pattern for library code): it is how doctest-style checks work, and it keeps every example true.
Pages whose examples load the default model (SmolLM2-135M) are marked ``real_weights``.
A block opened with "```python gpu" (or "```python gpu:N", N CUDA devices) runs only in
``test_gpu_python_blocks_run``, with the page's other blocks, where that many CUDA devices exist.
"""

import linecache
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))

# A fence that opens a runnable block: exactly "```python" at the start of a line;
# "```python gpu" / "```python gpu:N" open blocks that need one / N CUDA devices.
OPEN = re.compile(r"^```python(?P<gpu> gpu(?::(?P<n>\d+))?)?[ \t]*$")
CLOSE = re.compile(r"^```[ \t]*$")
# What marks a page as using the default model's real weights.
REAL_WEIGHTS = re.compile(r"prepare_smollm2|resolve_default_model")
LINK = re.compile(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)")


def gpus_needed(line: str) -> int:
    """How many CUDA devices the block a ```python fence opens needs (0 for a plain block)."""
    match = OPEN.match(line)
    assert match is not None
    return 0 if match["gpu"] is None else int(match["n"] or 1)


def python_blocks(page: Path, gpus: int = 0) -> list[tuple[int, str]]:
    """(line number of the opening fence, source) for every ```python block of ``page`` that needs at
    most ``gpus`` CUDA devices."""
    blocks, current, start, skip = [], None, 0, False
    for lineno, line in enumerate(page.read_text().splitlines(), start=1):
        if current is None:
            if OPEN.match(line):
                current, start, skip = [], lineno, gpus_needed(line) > gpus
            elif line.lstrip().startswith("```python") and line != line.lstrip():
                raise ValueError(f"{page.name}:{lineno}: an indented ```python fence would not be run")
        elif CLOSE.match(line):
            if not skip:
                blocks.append((start, "\n".join(current) + "\n"))
            current = None
        else:
            current.append(line)
    if current is not None:
        raise ValueError(f"{page.name}:{start}: ```python block is never closed")
    return blocks


def page_param(page: Path):
    uses_real_weights = any(REAL_WEIGHTS.search(code) for _, code in python_blocks(page))
    marks = [pytest.mark.real_weights] if uses_real_weights else []
    return pytest.param(page, marks=marks, id=page.name)


def test_docs_exist():
    names = {page.name for page in PAGES}
    assert {"README.md", "quickstart.md", "conventions.md", "hooks.md"} <= names, names


# Pages that compile the model run in a clean subprocess: this suite wraps hooked_attn in jaxtyping's
# runtime checker (pyproject's addopts), which torch.compile cannot trace; users run the plain library.
NEEDS_PLAIN_LIBRARY = re.compile(r"torch\.compile\(")
RUN_PAGE = """
import linecache, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from tests.test_docs import python_blocks
page = Path(sys.argv[1])
namespace = vars(sys.modules["__main__"])  # dynamo looks globals up in the module its code came from
for number, (lineno, code) in enumerate(python_blocks(page), start=1):
    filename = f"docs/{page.name}, python block {number} (line {lineno})"
    linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
    exec(compile(code, filename, "exec"), namespace)
"""


@pytest.mark.parametrize("page", [page_param(page) for page in PAGES])
def test_python_blocks_run(page: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if any(NEEDS_PLAIN_LIBRARY.search(code) for _, code in python_blocks(page)):
        root = DOCS.parent
        done = subprocess.run([sys.executable, "-c", RUN_PAGE, str(page), str(root)], capture_output=True, text=True,
                              cwd=root, timeout=900)
        assert done.returncode == 0, f"docs/{page.name} failed in a plain subprocess:\n{done.stderr[-4000:]}"
        return
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for number, (lineno, code) in enumerate(python_blocks(page), start=1):
        filename = f"docs/{page.name}, python block {number} (line {lineno})"
        # Registered so that tracebacks show the failing line of the page.
        linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
        try:
            exec(compile(code, filename, "exec"), namespace)
        except Exception as err:
            raise AssertionError(
                f"{filename} raised {type(err).__name__}: {err}"
            ) from err


def _gpus_of(page: Path) -> int:
    return max((gpus_needed(line) for line in page.read_text().splitlines() if OPEN.match(line)), default=0)


GPU_PAGES = [page for page in PAGES if _gpus_of(page)]


@pytest.mark.gpu
@pytest.mark.parametrize("page", GPU_PAGES, ids=[page.name for page in GPU_PAGES])
def test_gpu_python_blocks_run(page: Path, monkeypatch) -> None:
    """Every block of a page with GPU examples, GPU ones included, in order (plain blocks also run,
    without the GPU ones, in test_python_blocks_run)."""
    need, have = _gpus_of(page), torch.cuda.device_count()
    if have < need:
        pytest.skip(f"docs/{page.name} has examples for {need} CUDA device(s); this machine has {have}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for number, (lineno, code) in enumerate(python_blocks(page, gpus=have), start=1):
        filename = f"docs/{page.name}, python block {number} (line {lineno})"
        linecache.cache[filename] = (len(code), None, code.splitlines(keepends=True), filename)
        exec(compile(code, filename, "exec"), namespace)


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_links_between_pages_resolve(page: Path) -> None:
    missing = [target for target in LINK.findall(page.read_text())
               if not target.startswith(("http:", "https:")) and not (page.parent / target).is_file()]
    assert not missing, f"docs/{page.name} links to missing pages: {missing}"
