"""The TransformerLens compatibility layer: install, toy models from a TL config, TL semantics, gradients."""

import pytest
import torch

import hooked_attn
from hooked_attn.factored_matrix import FactoredMatrix


def toy(tl, **kw):
    args = dict(n_layers=2, d_model=16, d_head=4, n_ctx=12, d_vocab=23, act_fn="gelu", seed=0) | kw
    return tl.HookedTransformer(tl.HookedTransformerConfig(**args))


def test_install_maps_submodules_and_config_derives_fields(tl):
    import transformer_lens.utils as utils
    from transformer_lens.hook_points import HookPoint

    assert tl.__name__ == "hooked_attn.compat.transformer_lens" and HookPoint is hooked_attn.HookPoint
    assert utils.get_act_name("pattern", 1) == "blocks.1.attn.hook_pattern"
    cfg = tl.HookedTransformerConfig(n_layers=2, d_model=16, d_head=4, n_ctx=8, d_vocab=20, act_fn="relu")
    assert (cfg.n_heads, cfg.d_mlp, cfg.d_vocab_out, cfg.attn_scale) == (4, 64, 20, 2.0)
    with pytest.raises(ValueError, match="act_fn"):
        tl.HookedTransformerConfig(n_layers=1, d_model=8, d_head=4, n_ctx=4, d_vocab=5)


def test_attention_only_model_has_no_mlp_and_gpt2_init(tl):
    model = toy(tl, attn_only=True)
    assert not any("mlp" in name or "ln2" in name or "resid_mid" in name for name in model.hook_dict)
    std = model.blocks[0].attn.W_Q.std().item()
    assert abs(std - model.cfg.initializer_range) < 0.3 * model.cfg.initializer_range
    assert torch.equal(model.blocks[0].attn.b_Q, torch.zeros_like(model.blocks[0].attn.b_Q))
    tokens = torch.randint(0, 23, (2, 6))
    logits, cache = model.run_with_cache(tokens)
    # The decomposition with TL's layer=-1 sums to the final residual stream.
    parts = cache.decompose_resid(layer=-1)
    torch.testing.assert_close(parts.sum(0), cache["blocks.1.hook_resid_post"], atol=1e-5, rtol=1e-5)
    assert cache.accumulated_resid(layer=-1).shape[0] == 3
    assert cache.stack_head_results(layer=-1).shape[0] == 2 * 4


def test_tokens_to_residual_directions_and_logit_soft_cap_sentinel(tl):
    model = toy(tl)
    torch.testing.assert_close(model.tokens_to_residual_directions(5), model.W_U[:, 5])
    assert model.tokens_to_residual_directions(torch.tensor([[1, 2, 3]])).shape == (1, 3, 16)
    with pytest.raises(ValueError, match="ids in 0..22"):
        model.tokens_to_residual_directions(23)
    # TL's output_logits_soft_cap=-1.0 means "no cap": logits are the unembedded residual stream.
    tokens = torch.randint(0, 23, (1, 5))
    logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(logits, model.unembed(model.ln_final(cache["blocks.1.hook_resid_post"])))


def test_has_hooks_is_a_method_and_still_truthy():
    point = hooked_attn.HookPoint()
    assert not point.has_hooks and not point.has_hooks()
    point.add_hook(lambda x, hook: None, dir="bwd", is_permanent=True, level=2)
    assert point.has_hooks and point.has_hooks(dir="bwd") and not point.has_hooks(dir="fwd")
    assert not point.has_hooks(including_permanent=False) and point.has_hooks(level=2)
    assert point.list_hooks()[0].is_permanent and point.list_hooks()[0].context_level == 2
    with pytest.raises(ValueError, match="dir"):
        point.has_hooks(dir="up")


def test_incl_bwd_calls_backward_like_transformer_lens(tl):
    model = toy(tl)
    tokens = torch.randint(0, 23, (2, 6))
    loss, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    assert "blocks.0.hook_resid_pre_grad" in cache and "blocks.0.ln1.hook_scale_grad" in cache
    with pytest.raises(ValueError, match="incl_bwd='deferred'"):
        model.run_with_cache(tokens, incl_bwd=True)
    assert model.n_hooks() == 0


def test_backward_hooks_fire_on_every_hook_point(tl):
    model = toy(tl)
    fired = set()
    tokens = torch.randint(0, 23, (2, 6))
    with model.hooks(bwd_hooks=[(lambda name: True, lambda g, hook: fired.add(hook.name))]):
        model(tokens, return_type="loss").backward()
    assert fired == set(model.hook_dict)  # hook_scale included; hook_result too, since it is hooked


def _reference_grad(model, tokens):
    """The gradient of the loss with respect to W_E computed by hand, with every norm scale and every
    attention pattern detached (the same network, written out with plain torch ops)."""
    W_E = model.embed.W_E.detach().clone().requires_grad_(True)

    def ln(x, norm):
        x = x - x.mean(-1, keepdim=True)
        scale = (x.pow(2).mean(-1, keepdim=True) + norm.cfg.eps).sqrt().detach()
        return x / scale * norm.w + norm.b

    resid = W_E[tokens] + model.pos_embed.W_pos[: tokens.shape[1]]
    n = tokens.shape[1]
    for block in model.blocks:
        a = block.attn
        h = ln(resid, block.ln1)
        q = torch.einsum("bpm,hmd->bphd", h, a.W_Q) + a.b_Q
        k = torch.einsum("bpm,hmd->bphd", h, a.W_K) + a.b_K
        v = torch.einsum("bpm,hmd->bphd", h, a.W_V) + a.b_V
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * a.scale
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        pattern = scores.softmax(-1).detach()
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        resid = resid + torch.einsum("bqhd,hdm->bqm", z, a.W_O) + a.b_O
        m = block.mlp
        resid = resid + m.act(ln(resid, block.ln2) @ m.W_in + m.b_in) @ m.W_out + m.b_out
    logits = ln(resid, model.ln_final) @ model.W_U + model.b_U
    metric(logits).backward()
    return W_E.grad


def metric(logits):
    """A float64 scalar of the logits (the model's own loss is computed in float32)."""
    return logits[:, -1].logsumexp(-1).sum() - logits[:, :, 3].sum()


def test_detaching_patterns_and_scales_gives_the_detached_gradient(tl):
    model = toy(tl).double()
    tokens = torch.randint(0, 23, (2, 7))
    detach = lambda x, hook: x.detach()  # noqa: E731
    frozen = lambda name: name.endswith("hook_pattern") or name.endswith("hook_scale")  # noqa: E731
    with model.hooks(fwd_hooks=[(frozen, detach)]):
        metric(model(tokens)).backward()
    torch.testing.assert_close(model.embed.W_E.grad, _reference_grad(model, tokens), atol=1e-10, rtol=1e-8)
    model.zero_grad()
    metric(model(tokens)).backward()  # without the hooks the gradient differs
    assert not torch.allclose(model.embed.W_E.grad, _reference_grad(model, tokens), atol=1e-6)


def test_factored_matrix_transformer_lens_semantics():
    L = H = 3
    A, B = torch.randn(L, H, 8, 2, dtype=torch.float64), torch.randn(L, H, 2, 8, dtype=torch.float64)
    fm = FactoredMatrix(A, B)
    v = torch.randn(8, dtype=torch.float64)
    # n_layers == n_heads: a vector multiplies every matrix, no batch mixing.
    torch.testing.assert_close(v @ fm, torch.einsum("m,lhmn->lhn", v, fm.AB))
    torch.testing.assert_close(fm @ v, torch.einsum("lhmn,n->lhm", fm.AB, v))
    U, S, V = fm.svd()
    torch.testing.assert_close(U @ torch.diag_embed(S) @ V.mT, fm.AB)
    wide = FactoredMatrix(torch.randn(5, 6), torch.randn(6, 4))  # inner 6 > 4 rows of the next factor
    assert (wide @ torch.randn(4, 5)).mdim == 4 and (torch.randn(3, 5) @ wide).mdim == 5
    torch.testing.assert_close((wide @ wide.T).AB, wide.AB @ wide.AB.T, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="scalar only"):
        fm * torch.randn(2)
    with pytest.raises(ValueError, match="columns against"):
        fm @ torch.randn(5, 2)
    bf = FactoredMatrix(torch.randn(6, 3).bfloat16(), torch.randn(3, 6).bfloat16())
    assert bf.eigenvalues.dtype == torch.complex64


def test_training_an_attention_only_model_on_repeated_sequences_raises_the_induction_score(tl):
    """TransformerLens' train() on a 2-layer attention-only model, random 12-token sequences repeated
    twice: some head's induction score (mean attention to the token after the earlier copy) goes from
    chance (~0.06) past 0.5. With one fixed period a head may get there by attending a fixed distance
    back; this checks the score TransformerLens' detector reports, not which circuit produces it."""
    from hooked_attn.analysis.heads import induction_scores, repeated_random_tokens
    from transformer_lens.train import HookedTransformerTrainConfig, train

    model = toy(tl, attn_only=True, d_model=32, d_head=8, n_ctx=24, d_vocab=30)
    before = induction_scores(model, seq_len=12, batch=8, seed=2)
    dataset = [{"tokens": t} for t in repeated_random_tokens(30, 12, batch=300 * 32, seed=1)]
    train(model, HookedTransformerTrainConfig(num_epochs=1, batch_size=32, lr=3e-3, seed=0, print_every=None), dataset)
    after = induction_scores(model, seq_len=12, batch=8, seed=2)  # held-out sequences (another seed)
    assert before.max() < 0.2 and after.max() > 0.5, (before, after)


def copied_block_tokens(n: int, d_vocab: int, n_pos: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of distinct random tokens in which a block of random length (2..15) at a random
    start is copied right after itself, and a mask of the positions whose token the copy predicts."""
    tokens, predictable = torch.empty(n, n_pos, dtype=torch.long), torch.zeros(n, n_pos, dtype=torch.bool)
    for i in range(n):
        length = int(torch.randint(2, 16, (1,), generator=gen))
        start = int(torch.randint(0, n_pos - 2 * length + 1, (1,), generator=gen))
        fresh = torch.randperm(d_vocab, generator=gen)[:n_pos - length]
        tokens[i] = torch.cat([fresh[:start + length], fresh[start:start + length], fresh[start + length:]])
        predictable[i, start + length + 1:start + 2 * length] = True
    return tokens, predictable


def test_a_two_layer_attention_only_model_learns_a_previous_token_then_induction_circuit(tl):
    """Copies of random length at random places, so no fixed-distance head can predict them: training
    on the copied tokens only builds the two-layer circuit. On held-out sequences a layer-0 head attends
    to the previous token and a layer-1 head to the token after the earlier copy of the current one.
    The circuit appears in a sudden phase change whose timing depends on the seeds: with these it is done
    by step ~800 (induction 0.98, previous-token 0.76 at step 1000); with model/data seeds (1, 2) and
    (2, 3) it had not begun after 2500 steps (measured with torch 2.13 CPU, one thread)."""
    from hooked_attn.analysis.heads import attention_patterns, induction_target, pattern_scores, previous_token_target

    model = toy(tl, attn_only=True, d_model=32, d_head=16, n_ctx=32, d_vocab=64)
    held, _ = copied_block_tokens(64, 64, 32, torch.Generator().manual_seed(99))

    def scores():
        patterns = attention_patterns(model, held)
        return pattern_scores(patterns, induction_target(held)), pattern_scores(patterns, previous_token_target(32))

    induction_before, previous_before = scores()
    optimizer, gen = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0), torch.Generator().manual_seed(1)
    for _ in range(1000):
        tokens, predictable = copied_block_tokens(32, 64, 32, gen)
        log_probs = model(tokens)[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]
        loss = -(log_probs * predictable[:, 1:]).sum() / predictable[:, 1:].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    induction, previous = scores()
    assert induction_before.max() < 0.2 and previous_before.max() < 0.2, (induction_before, previous_before)
    assert induction.argmax() // 2 == 1 and induction[1].max() > 0.8, induction  # the best head is in layer 1
    assert previous[0].max() > 0.5, previous


def test_transformer_lens_kv_cache_drives_the_model_and_freezes(tl):
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.utilities.cache import get_pos_offset

    model = toy(tl, n_key_value_heads=2)
    tokens = torch.randint(0, 23, (2, 7), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, "cpu", batch_size=2)
    assert cache[0].past_keys.shape == (2, 0, 2, 4) and get_pos_offset(cache, 2) == 0
    model(tokens[:, :5], past_kv_cache=cache)
    assert get_pos_offset(cache, 2) == 5 and cache.previous_attention_mask.shape == (2, 5)
    cache.freeze()
    step = model(tokens[:, 5:6], past_kv_cache=cache)
    torch.testing.assert_close(step[:, 0], full[:, 5], atol=1e-5, rtol=1e-5)
    assert get_pos_offset(cache, 2) == 5  # frozen: read, not extended
    cache.unfreeze()
    rest = model(tokens[:, 5:], past_kv_cache=cache)
    torch.testing.assert_close(rest, full[:, 5:], atol=1e-5, rtol=1e-5)
    assert get_pos_offset(cache, 2) == 7 and cache.previous_attention_mask.shape == (2, 7)


def test_activation_cache_batch_axis_rules(tl):
    model = toy(tl)
    _, cache = model.run_with_cache(torch.zeros(3, 5, dtype=torch.long))
    assert type(cache).__name__ == "ActivationCache" and cache.batch_size() == 3
    sliced = cache.apply_slice_to_batch_dim((1, 3))
    assert sliced["blocks.0.hook_resid_pre"].shape == (2, 5, 16) and sliced.has_batch_dim
    torch.testing.assert_close(sliced["blocks.1.attn.hook_pattern"], cache["blocks.1.attn.hook_pattern"][1:3])
    one = cache.apply_slice_to_batch_dim(2)
    assert not one.has_batch_dim and one["blocks.0.hook_resid_pre"].shape == (5, 16)
    with pytest.raises(ValueError, match="batch size 3"):
        cache.remove_batch_dim()
    mixed = tl.ActivationCache({"a": torch.ones(1, 5, 4), "b": torch.ones(1, 5), "bias": torch.ones(5, 5)}, None)
    mixed.remove_batch_dim()
    assert (mixed["a"].shape, mixed["b"].shape, mixed["bias"].shape) == ((5, 4), (5,), (5, 5))


def test_standalone_mlps_follow_transformer_lens_equations(tl):
    from transformer_lens.components import GatedMLP, LayerNorm, MLP

    cfg = dict(n_layers=1, d_model=8, d_head=4, n_ctx=4, d_mlp=16, act_fn="solu_ln", seed=0)
    mlp = MLP(cfg)
    assert isinstance(mlp.ln, LayerNorm) and mlp.ln.w.shape == (16,)
    x = torch.randn(2, 3, 8)
    pre = x @ mlp.W_in + mlp.b_in
    mid = pre * pre.softmax(-1)
    normed = (mid - mid.mean(-1, keepdim=True)) / (mid.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(mlp(x), normed @ mlp.W_out + mlp.b_out, atol=1e-5, rtol=1e-5)
    gated = GatedMLP(cfg | {"act_fn": "silu"})
    with torch.no_grad():
        gated.b_in.fill_(0.5)
    expected = (torch.nn.functional.silu(x @ gated.W_gate) * (x @ gated.W_in) + 0.5) @ gated.W_out + gated.b_out
    torch.testing.assert_close(gated(x), expected)
    with pytest.raises(ValueError, match="d_mlp"):
        bad = tl.HookedTransformerConfig(**cfg)
        bad.d_mlp = None
        MLP(bad)


def test_next_sentence_prediction_wraps_an_encoder_with_pooler_and_head(tl):
    cfg = tl.HookedTransformerConfig(n_layers=1, d_model=8, d_head=4, n_ctx=6, d_vocab=11, act_fn="gelu", seed=0)
    encoder = tl.HookedEncoder(cfg)
    nsp = tl.BertNextSentencePrediction(encoder)
    tokens, types = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="no pooler"):
        nsp(tokens, token_type_ids=types)
    with pytest.raises(ValueError, match="token_type_ids"):
        nsp(tokens)
    encoder.pooler = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
    encoder.nsp_head = torch.nn.Linear(8, 2)
    logits = nsp(tokens, token_type_ids=types)
    resid = encoder(tokens, return_type="embeddings", token_type_ids=types)
    torch.testing.assert_close(logits, encoder.nsp_head(encoder.pooler(resid)))
    out, cache = nsp.run_with_cache(tokens, token_type_ids=types)
    torch.testing.assert_close(out, logits)
    assert cache.model is nsp and "blocks.0.hook_resid_post" in cache and "forward" not in vars(encoder)


def test_abstract_attention_alibi_helpers(tl):
    from transformer_lens.components import AbstractAttention

    bias = AbstractAttention.create_alibi_bias(4, 3, "cpu")
    slopes = hooked_attn.components.alibi.alibi_slopes(4)
    assert bias.shape == (4, 3, 3) and torch.equal(torch.triu(bias), torch.zeros_like(bias))
    torch.testing.assert_close(bias[:, 2, 0], -2 * slopes)


def test_d_vocab_comes_from_the_tokenizer_when_not_given(tl):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"a": 0, "b": 6, "c": 2, "[UNK]": 3}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")))
    cfg = tl.HookedTransformerConfig(n_layers=1, d_model=8, d_head=4, n_ctx=4, act_fn="relu")
    model = tl.HookedTransformer(cfg, tokenizer=tokenizer)
    assert (cfg.d_vocab, cfg.d_vocab_out) == (7, 7) and model.W_U.shape == (8, 7)
    enc_cfg = tl.HookedTransformerConfig(n_layers=1, d_model=8, d_head=4, n_ctx=4, act_fn="gelu")
    with pytest.raises(ValueError, match="Must provide a tokenizer"):
        tl.HookedEncoder(enc_cfg)
    encoder = tl.HookedEncoder(enc_cfg, tokenizer=tokenizer)
    assert enc_cfg.d_vocab == 7 and encoder.W_E.shape == (7, 8)
