"""SAEs spliced under hostile settings: the error term gives the activation back, bad heads are named."""

import pytest
import torch

from _reliability import tiny_llama
from hooked_attn.saes import SAE, SAEConfig

TOKENS = torch.tensor([[4, 5, 6, 7], [8, 9, 10, 11]])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_lower_precision_sae_with_its_error_term_leaves_the_model_unchanged(dtype):
    """The error was taken in the SAE's dtype, so the model got its activation back rounded to
    float16 (logits off by ~3e-3); now it is taken in the wider dtype: fp32 rounding only."""
    model = tiny_llama()
    clean = model(TOKENS)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(architecture="standard", d_in=32, d_sae=64, hook_name="blocks.0.hook_resid_post", dtype=dtype))
    with torch.no_grad():
        spliced = model.run_with_saes(TOKENS, saes=[sae], use_error_term=True)
    torch.testing.assert_close(spliced, clean, atol=1e-5, rtol=1e-5)
    assert model.acts_to_saes == {} and model.n_hooks() == 0


@pytest.mark.parametrize("head", [4, -5])
def test_a_head_index_outside_the_activation_is_named(head):
    model = tiny_llama()
    clean = model(TOKENS)
    sae = SAE(SAEConfig(architecture="standard", d_in=8, d_sae=16, hook_name="blocks.0.attn.hook_z", hook_head_index=head))
    with pytest.raises(ValueError, match=rf"head index {head} does not fit 'blocks.0.attn.hook_z'.*\(2, 4, 4, 8\)"):
        model.run_with_saes(TOKENS, saes=[sae])
    assert model.acts_to_saes == {} and model.n_hooks() == 0
    torch.testing.assert_close(model(TOKENS), clean)
