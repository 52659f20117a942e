"""``hooked-attn doctor``: one row per family and variant, refusals reported with their reason."""

import json

from transformers import FalconConfig

from hooked_attn.architectures import REGISTRY
from hooked_attn.cli import main
from hooked_attn.doctor import AGREEMENT, check_variant, format_rows, run_doctor


def test_every_variant_of_a_family_gets_a_row_that_agrees_with_hf():
    rows = run_doctor(["GPT2LMHeadModel", "BertForMaskedLM"])
    expected = [(f, v) for f in ("GPT2LMHeadModel", "BertForMaskedLM") for v in REGISTRY[f].tiny_hf_configs()]
    assert [(r.family, r.variant) for r in rows] == expected
    for row in rows:
        assert row.status == "ok", row
        assert 0 <= row.unprocessed <= AGREEMENT and 0 <= row.processed <= AGREEMENT


def test_a_refused_config_is_a_row_with_the_converters_reason():
    """What upgrading to transformers 5.25 did to Falcon before derived fields were checked: here the
    derived field disagrees with the converter, so the refusal is right and the doctor shows why."""
    hf_cfg = FalconConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          ffn_hidden_size=48, multi_query=False)
    hf_cfg.num_key_value_heads = 2
    row = check_variant(REGISTRY["FalconForCausalLM"], "edited", hf_cfg)
    assert row.status == "refused" and row.unprocessed is None
    assert "config field num_key_value_heads=2" in row.reason
    table = format_rows([row])
    assert "refused: FalconForCausalLM: config field num_key_value_heads=2" in table
    assert table.splitlines()[-1] == "1 variants: 0 ok, 0 differs, 1 refused, 0 error"


def test_cli_prints_the_table_and_exits_by_the_rows(capsys):
    assert main(["doctor", "--family", "GPT2LMHeadModel"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("hooked_attn doctor: torch ") and "transformers " in out[0]
    assert len(out) == 2 + len(REGISTRY["GPT2LMHeadModel"].tiny_hf_configs()) + 1
    assert main(["doctor", "--family", "GPT2LMHeadModel", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["status"] for r in rows} == {"ok"}
    assert main(["doctor", "--family", "MambaForCausalLM"]) == 2
    assert "MambaForCausalLM not registered" in capsys.readouterr().err
