"""The fallback for unregistered HF families: from_pretrained(..., fallback="wrap") and wrap_hf."""

import pytest
import torch
import transformers

from hooked_attn import HookedTransformer, UnknownArchitectureError
from hooked_attn.wrap import WrappedHFModel, unwrap, wrap_hf


@pytest.fixture(scope="module")
def helium_folder(tmp_path_factory) -> tuple:
    """A tiny random Helium (not in the registry) saved as an HF folder, and the model itself."""
    torch.manual_seed(0)
    config = transformers.HeliumConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = transformers.HeliumForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("helium")
    model.save_pretrained(folder)
    return folder, model


def test_unknown_architecture_error_names_the_fallback(helium_folder) -> None:
    folder, _ = helium_folder
    with pytest.raises(UnknownArchitectureError, match=r"HeliumForCausalLM.*fallback='wrap'"):
        HookedTransformer.from_pretrained(folder)
    with pytest.raises(ValueError, match="fallback must be None or 'wrap'"):
        HookedTransformer.from_pretrained(folder, fallback="convert")


def test_fallback_wrap_hooks_every_module_output_and_attention_call(helium_folder) -> None:
    folder, reference = helium_folder
    wrapped = HookedTransformer.from_pretrained(folder, fallback="wrap")
    assert isinstance(wrapped, WrappedHFModel)
    clean, corrupt = torch.randint(0, 99, (2, 6)), torch.randint(0, 99, (2, 6))
    with torch.no_grad():
        expected = reference(clean).logits
        out, cache = wrapped.run_with_cache(clean)
    assert torch.equal(out.logits, expected)  # caching every hook point reads; the HF model's output is kept
    assert wrapped.attention_layers == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    for name in ("model.layers.0.hook_out", "model.layers.1.mlp.down_proj.hook_out", "model.norm.hook_out",
                 "model.layers.0.self_attn.hook_pattern", "lm_head.hook_out"):
        assert name in cache, name
    assert cache["pattern", 1].shape == (2, 4, 6, 6)
    assert (cache["pattern", 1].triu(1) == 0).all()  # causal
    torch.testing.assert_close(cache["lm_head.hook_out"], expected)

    # Activation patching: the clean last layer's output, patched into the corrupted run, gives the
    # clean logits (the final norm and head read nothing else); one position only changes that position on.
    def patch(output, hook, pos=slice(None)):
        output = output.clone()
        output[:, pos] = cache[hook.name][:, pos]
        return output

    with torch.no_grad():
        patched = wrapped.run_with_hooks(corrupt, fwd_hooks=[("model.layers.1.hook_out", patch)]).logits
        torch.testing.assert_close(patched, expected, atol=0, rtol=0)
        corrupted = wrapped(corrupt).logits
        one = wrapped.run_with_hooks(corrupt, fwd_hooks=[(
            "model.layers.0.hook_out", lambda output, hook: patch(output, hook, pos=slice(3, 4)))]).logits
    assert torch.equal(one[:, :3], corrupted[:, :3]) and not torch.allclose(one[:, 3:], corrupted[:, 3:])
    assert wrapped.n_hooks() == 0


def test_wrap_hf_switches_an_eager_model_to_sdpa_and_unwraps() -> None:
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=37, image_size=16, patch_size=4, attn_implementation="eager")
    model = transformers.ViTModel(config).eval()
    wrapped = wrap_hf(model)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        _, cache = wrapped.run_with_cache(pixel_values=torch.randn(1, 3, 16, 16))
    assert cache["pattern", 0].shape == (1, 4, 17, 17) and "layers.0.hook_out" in cache
    assert unwrap(wrapped) is model


def test_cli_attention_on_an_unregistered_family(helium_folder, tmp_path, capsys) -> None:
    from test_cli_attention import TEXT, word_tokenizer

    from hooked_attn.cli import main

    folder, reference = helium_folder
    word_tokenizer().save_pretrained(folder)
    html = tmp_path / "view.html"
    assert main(["attention", str(folder), TEXT, "--layer", "1", "--head", "2", "--html", str(html)]) == 0
    shown = capsys.readouterr().out
    assert "HeliumForCausalLM, not converted" in shown and "layer 1 head 2" in shown
    assert "no attention patterns" not in html.read_text()
    assert "layers" in html.read_text() and "sat" in shown  # the page holds the patterns; the tokens are shown
