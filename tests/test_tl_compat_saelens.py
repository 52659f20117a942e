"""The pieces of the TransformerLens layer SAELens relies on, checked without SAELens (the real package runs
in scripts/saelens_interop, in a side venv): a subclass's own ``__init__`` runs in ``from_pretrained``
(SAELens' HookedSAETransformer), which takes TransformerLens' ``model_name=`` keyword,
``run_with_cache(return_cache_object=False)``, ``to_tokens(truncate=)`` and the names SAELens imports."""

import pytest
import torch

import hooked_attn
from conftest import tiny_hf_model
from hooked_attn.architectures.gpt2 import tiny_hf_configs as gpt2_configs
from hooked_attn.default_model import gpt2_tokenizer


@pytest.fixture(scope="module")
def hf_gpt2():
    tokenizer = gpt2_tokenizer()
    cfg = gpt2_configs()["default"]
    cfg.vocab_size = len(tokenizer)
    return tiny_hf_model(cfg), tokenizer


def test_from_pretrained_builds_a_subclass_through_its_own_init(tl, hf_gpt2):
    class WithExtras(tl.HookedTransformer):  # what SAELens' HookedSAETransformer does in its __init__
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.extras: dict = {}
            for block in self.blocks:
                block.mlp.hook_in = tl.hook_points.HookPoint()
            self.setup()

    hf, tokenizer = hf_gpt2
    model = WithExtras.from_pretrained(hf, tokenizer=tokenizer)
    assert type(model) is WithExtras and model.extras == {} and "blocks.1.mlp.hook_in" in model.hook_dict
    plain = tl.HookedTransformer.from_pretrained(hf, tokenizer=tokenizer)
    tokens = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(model(tokens), plain(tokens), atol=1e-5, rtol=1e-5)
    assert type(WithExtras.from_pretrained_no_processing(model_name=hf, tokenizer=tokenizer)) is WithExtras


def test_run_with_cache_can_return_the_plain_dict(tl, hf_gpt2):
    hf, tokenizer = hf_gpt2
    model = tl.HookedTransformer.from_pretrained(hf, tokenizer=tokenizer)
    tokens = torch.tensor([[5, 6, 7]])
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_post"])
    _, as_dict = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_post"], return_cache_object=False)
    assert type(as_dict) is dict and list(as_dict) == ["blocks.0.hook_resid_post"]
    torch.testing.assert_close(as_dict["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_post"])


def test_to_tokens_truncates_to_the_context_as_transformer_lens_does(tl, hf_gpt2):
    hf, tokenizer = hf_gpt2
    model = tl.HookedTransformer.from_pretrained(hf, tokenizer=tokenizer)
    n_ctx = model.cfg.n_ctx
    text = " word" * (n_ctx + 5)
    assert model.to_tokens(text).shape == (1, n_ctx)
    assert model.to_tokens(text, truncate=False).shape == (1, n_ctx + 5)
    padded = model.to_tokens([text, "short"])
    assert padded.shape == (2, n_ctx)
    logits = model(padded)  # the padding mask is cut with the ids and still used
    torch.testing.assert_close(logits[1, :1], model(model.to_tokens("short"))[0], atol=1e-4, rtol=1e-4)


def test_names_saelens_imports(tl):
    from transformer_lens.HookedTransformer import HookedRootModule, Loss, Output  # noqa: F401
    from transformer_lens.utils import USE_DEFAULT_VALUE, get_tokens_with_bos_removed  # noqa: F401

    assert HookedRootModule is hooked_attn.hook_points.HookedRootModule and USE_DEFAULT_VALUE is None
    logits, loss = Output(torch.zeros(1, 2, 3), torch.tensor(0.5))
    assert logits.shape == (1, 2, 3) and loss.item() == 0.5


class _Doubler(torch.nn.Module):
    """A module put in a HookPoint's place, as SAELens' HookedSAETransformer puts its SAE wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * 2


@pytest.mark.parametrize("site", ["blocks.0.ln1.hook_scale", "blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_pattern",
                                  "blocks.0.attn.hook_result", "blocks.1.hook_resid_pre"])
def test_a_module_swapped_in_for_a_hook_point_is_called(tl, hf_gpt2, site):
    hf, tokenizer = hf_gpt2
    model = tl.HookedTransformer.from_pretrained(hf, tokenizer=tokenizer)
    tokens = torch.tensor([[5, 6, 7, 8]])
    expected = model.run_with_hooks(tokens, fwd_hooks=[(site, lambda x, hook: x * 2)])
    parent, leaf = site.rsplit(".", 1)
    swapped = _Doubler()
    setattr(model.get_submodule(parent), leaf, swapped)  # the sites the fused paths check (hook_scale, pattern...)
    torch.testing.assert_close(model(tokens), expected, atol=1e-5, rtol=1e-5)
    assert swapped.calls == 1
