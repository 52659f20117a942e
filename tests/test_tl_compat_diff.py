"""Differences found by running the same tiny models through TransformerLens 3.9.0 and this layer
(session 6 differential probe); each test pins TransformerLens' behaviour by hand computation."""

import pytest
import torch



def toy(tl, **kw):
    args = dict(n_layers=2, d_model=16, d_head=4, n_ctx=12, d_vocab=23, d_mlp=32, act_fn="gelu", seed=0) | kw
    return tl.HookedTransformer(tl.HookedTransformerConfig(**args))


def test_one_dimensional_token_ids_are_one_row(tl):
    # TransformerLens adds a batch axis to [pos] ids; this layer refused them.
    model = toy(tl)
    ids = torch.tensor([1, 5, 7, 2])
    row = model(ids[None])
    assert torch.equal(model(ids), row)
    logits, cache = model.run_with_cache(ids)
    assert logits.shape == (1, 4, 23) and cache["blocks.0.hook_resid_pre"].shape == (1, 4, 16)
    assert torch.equal(model.run_with_hooks(ids, fwd_hooks=[]), row)
    expected = torch.nn.functional.cross_entropy(row[0, :-1], ids[1:])
    torch.testing.assert_close(model(ids, return_type="loss"), expected)
    with pytest.raises(ValueError, match="token ids"):
        model(torch.zeros(2, 3, 4, dtype=torch.long))  # other ranks are still refused


def test_transformer_lens_state_dict_loads_strictly(tl):
    # A TransformerLens state dict of a grouped-query, gated, rotary model names K/V `_W_K`/`_W_V`/
    # `_b_K`/`_b_V`, carries derived buffers (IGNORE, mask, rotary tables) and has no b_gate; before,
    # strict loading raised and strict=False silently kept the initial K/V weights.
    model = toy(tl, n_heads=4, n_key_value_heads=2, normalization_type="RMS", positional_embedding_type="rotary",
                rotary_dim=4, gated_mlp=True, act_fn="silu")
    g = torch.Generator().manual_seed(3)
    theirs = {}
    for name, p in model.state_dict().items():
        head, _, leaf = name.rpartition(".")
        leaf = {"W_K": "_W_K", "W_V": "_W_V", "b_K": "_b_K", "b_V": "_b_V"}.get(leaf, leaf) if ".attn" in head else leaf
        if leaf == "b_gate":
            continue
        theirs[f"{head}.{leaf}"] = torch.randn(p.shape, generator=g)
    for layer in range(2):
        for extra, t in [("IGNORE", torch.tensor(-1e5)), ("mask", torch.ones(12, 12).tril().bool()),
                         ("rotary_sin", torch.zeros(12, 4)), ("rotary_cos", torch.ones(12, 4))]:
            theirs[f"blocks.{layer}.attn.{extra}"] = t
    before = {k: v.clone() for k, v in theirs.items()}
    model.load_state_dict(theirs)  # strict
    assert theirs.keys() == before.keys() and all(torch.equal(theirs[k], before[k]) for k in theirs)
    assert model.blocks[1].attn.W_K.shape == (2, 16, 4)  # this layer keeps K/V at their kv_head size
    assert torch.equal(model.blocks[1].attn.W_K, theirs["blocks.1.attn._W_K"])
    assert torch.equal(model.blocks[0].attn.b_V, theirs["blocks.0.attn._b_V"])
    assert not model.blocks[0].mlp.b_gate.any()
    # the derived buffers were not taken: head 0's rotation is still the real one (not zero sin / unit cos)
    ids = torch.tensor([[1, 5, 7, 2]])
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.startswith("blocks.0.attn.hook_"))
    assert not torch.allclose(cache["blocks.0.attn.hook_rot_q"][0, 1], cache["blocks.0.attn.hook_q"][0, 1])
    # kv head 0's values are the normalised embedding times the loaded _W_V[0] plus _b_V[0]
    normed = model.blocks[0].ln1(model.embed(ids))[0]
    expected = normed @ theirs["blocks.0.attn._W_V"][0] + theirs["blocks.0.attn._b_V"][0]
    torch.testing.assert_close(cache["blocks.0.attn.hook_v"][0, :, 0], expected)


def test_accumulated_resid_apply_ln_at_the_end_is_the_logit_lens(tl):
    # TransformerLens 3.9: accumulated_resid(apply_ln=True) up to the final layer passes each stream
    # through ln_final with its own mean and scale, then the gain and bias (apply_ln_to_stack's
    # recompute_ln=True); earlier layers keep the cached scale.
    model = toy(tl)
    with torch.no_grad():
        model.ln_final.w.copy_(torch.linspace(0.5, 2.0, 16))
        model.ln_final.b.copy_(torch.linspace(-1.0, 1.0, 16))
        _, cache = model.run_with_cache(torch.tensor([[1, 5, 7, 2, 9], [4, 4, 8, 11, 0]]))
        got, labels = cache.accumulated_resid(layer=-1, apply_ln=True, pos_slice=-1, return_labels=True)
        assert labels == ["0_pre", "1_pre", "final_post"]
        raw = torch.stack([cache["blocks.0.hook_resid_pre"], cache["blocks.1.hook_resid_pre"],
                           cache["blocks.1.hook_resid_post"]])[:, :, -1]
        centred = raw - raw.mean(-1, keepdim=True)
        by_hand = centred / (centred.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
        by_hand = by_hand * model.ln_final.w + model.ln_final.b
        torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.accumulated_resid(apply_ln=True)[-1], cache["ln_final.hook_normalized"])
        stack = cache.decompose_resid(layer=-1)
        torch.testing.assert_close(cache.apply_ln_to_stack(stack, recompute_ln=True)[0], model.ln_final(stack[0]))
        # not the last layer: the cached scale of block 1's ln1, as before
        mid = cache.accumulated_resid(layer=1)
        centred = mid - mid.mean(-1, keepdim=True)
        torch.testing.assert_close(cache.accumulated_resid(layer=1, apply_ln=True),
                                   centred / cache["blocks.1.ln1.hook_scale"])


def test_apply_ln_to_stack_after_the_last_block_uses_ln_final_even_for_mlp_input(tl):
    # layer == n_layers with mlp_input=True: there is no block n_layers, so ln_final reads the stream (as
    # TransformerLens does); before, the stack came back unnormalised because block n_layers' ln2 is absent.
    model = toy(tl, n_layers=1)
    _, cache = model.run_with_cache(torch.tensor([[1, 5, 7, 2, 9]]))
    stack = cache.decompose_resid(layer=1)
    centred = stack - stack.mean(-1, keepdim=True)
    torch.testing.assert_close(cache.apply_ln_to_stack(stack, layer=1, mlp_input=True),
                               centred / cache["ln_final.hook_scale"])


def test_W_E_pos_stacks_token_then_position_embeddings(tl):
    model = toy(tl)
    got = model.W_E_pos
    assert got.shape == (23 + 12, 16)
    assert torch.equal(got[:23], model.embed.W_E) and torch.equal(got[23:], model.pos_embed.W_pos)
    with pytest.raises(AttributeError):  # no learned positions
        toy(tl, positional_embedding_type="rotary", rotary_dim=4).W_E_pos


def test_factored_matrix_unsqueeze_adds_a_leading_axis():
    from hooked_attn.factored_matrix import FactoredMatrix, FactoredShapeError

    g = torch.Generator().manual_seed(0)
    fm = FactoredMatrix(torch.randn(3, 5, 2, generator=g), torch.randn(3, 2, 4, generator=g))
    for dim, shape in [(0, (1, 3, 5, 4)), (1, (3, 1, 5, 4)), (-4, (1, 3, 5, 4)), (-3, (3, 1, 5, 4))]:
        out = fm.unsqueeze(dim)
        assert out.shape == shape
        torch.testing.assert_close(out.AB, fm.AB.unsqueeze(dim if dim >= 0 else dim + 4))
    for bad in (2, -1, -2, 4, -5):
        with pytest.raises(FactoredShapeError, match="unsqueeze"):
            fm.unsqueeze(bad)
