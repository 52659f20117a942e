"""A TransformerLens-3.x IOI notebook on SmolLM2, with only the import changed (install_as_transformer_lens)."""

from functools import partial

import einops
import pytest
import torch

import hooked_attn
from hooked_attn.default_model import prepare_smollm2

pytestmark = pytest.mark.real_weights

PROMPTS = ["When John and Mary went to the shops, John gave the bag to",
           "When Tom and James went to the park, James gave the ball to"]
ANSWERS = [(" Mary", " John"), (" Tom", " James")]


@pytest.fixture(scope="module")
def tl():
    hooked_attn.install_as_transformer_lens()
    import transformer_lens

    return transformer_lens


def test_ioi_notebook_runs_with_only_the_import_changed(tl):
    # ---- the notebook, as written for TransformerLens 3.x ----
    from transformer_lens import HookedTransformer
    import transformer_lens.utils as utils

    model = HookedTransformer.from_pretrained(prepare_smollm2())
    tokens = model.to_tokens(PROMPTS)
    answer_tokens = torch.tensor([[model.to_single_token(a) for a in pair] for pair in ANSWERS])
    logits, cache = model.run_with_cache(tokens)

    answer_dirs = model.tokens_to_residual_directions(answer_tokens)
    logit_diff_dirs = answer_dirs[:, 0] - answer_dirs[:, 1]

    def logit_diff(logits):
        final = logits[:, -1]
        return (final.gather(-1, answer_tokens[:, :1]) - final.gather(-1, answer_tokens[:, 1:])).mean()

    resid_stack, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    resid_stack = cache.apply_ln_to_stack(resid_stack, layer=-1, pos_slice=-1)
    per_component = einops.einsum(resid_stack, logit_diff_dirs, "comp batch d_model, batch d_model -> comp") / 2
    per_head = cache.stack_head_results(layer=-1, pos_slice=-1)
    per_head = cache.apply_ln_to_stack(per_head, layer=-1, pos_slice=-1)
    head_attrs = einops.einsum(per_head, logit_diff_dirs, "comp batch d_model, batch d_model -> comp") / 2
    final_resid = cache["resid_post", -1][:, -1]

    corrupted = model.to_tokens([PROMPTS[1], PROMPTS[0]])

    def patch_head(z, hook, head, clean_cache):
        z[:, :, head] = clean_cache[hook.name][:, :, head]
        return z

    patched_logits = model.run_with_hooks(
        corrupted, fwd_hooks=[(utils.get_act_name("z", 20), partial(patch_head, head=3, clean_cache=cache))])
    with model.hooks(fwd_hooks=[(utils.get_act_name("resid_pre", 0), lambda x, hook: x)]):
        hooked_logits = model(tokens)
    text = model.generate(PROMPTS[0], max_new_tokens=3, verbose=False, do_sample=False)
    # ---- checks ----
    assert tokens.shape == corrupted.shape and logit_diff(logits) > 0
    assert labels[0] == "embed" and len(labels) == 1 + 2 * model.cfg.n_layers
    # The direct attributions sum to the logit difference (weights processed: ln_final is a pure scale).
    bias_term = (model.b_U[answer_tokens[:, 0]] - model.b_U[answer_tokens[:, 1]]).mean()
    torch.testing.assert_close(per_component.sum() + bias_term, logit_diff(logits), atol=2e-3, rtol=1e-3)
    assert head_attrs.shape == (model.cfg.n_layers * model.cfg.n_heads,)
    assert final_resid.shape == (2, model.cfg.d_model)
    assert patched_logits.shape == logits.shape and not torch.equal(patched_logits, model(corrupted))
    assert torch.equal(hooked_logits, model(tokens))  # an identity hook changes nothing
    assert text.startswith(PROMPTS[0]) and len(text) > len(PROMPTS[0]) and model.n_hooks() == 0
