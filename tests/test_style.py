"""House rules that keep the architecture visible: components never name a model family."""

from pathlib import Path

import pytest

import hooked_attn
from hooked_attn.architectures import REGISTRY

COMPONENTS = sorted((Path(hooked_attn.__file__).parent / "components").glob("*.py"))
LIBRARY = sorted(Path(hooked_attn.__file__).parent.rglob("*.py"))


@pytest.mark.parametrize("path", COMPONENTS, ids=lambda p: p.name)
def test_components_never_name_an_architecture(path):
    source = path.read_text()
    assert "ForCausalLM" not in source and "LMHeadModel" not in source and "hf_architecture" not in source
    for arch in REGISTRY.values():
        assert arch.model_type not in source.lower().split(), f"{path.name} mentions {arch.model_type}"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_library_modules_open_with_a_docstring_and_do_not_print(path):
    source = path.read_text()
    assert source.lstrip().startswith('"""'), f"{path} has no module docstring"
    if path.name != "cli.py":
        assert "\nprint(" not in source and "    print(" not in source, f"{path} prints; use logging"
