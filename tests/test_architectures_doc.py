"""docs/architectures.md is generated (scripts/architectures_table.py); it must list what the registry holds."""

from pathlib import Path

from hooked_attn.architectures import REGISTRY
from hooked_attn.architectures.bert import ENCODERS

PAGE = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"


def test_every_family_and_variant_is_in_the_generated_table():
    text = PAGE.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `")}
    for name, arch in {**REGISTRY, **ENCODERS}.items():
        row = next((r for key, r in rows.items() if key.strip("`").split(" ")[0].strip("`") == name), None)
        assert row is not None, f"{name} is registered but missing from docs/architectures.md: regenerate it"
        for variant in arch.tiny_hf_configs():
            assert f"{variant} (" in row, f"{name} variant {variant} missing: regenerate docs/architectures.md"
    assert "FAILED" not in text and "not run" not in text, "regenerate the page from a passing test run"
