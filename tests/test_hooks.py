"""Hook points: every documented hook fires once per forward with its documented shape, edits take
effect, hooks are always removed, and bad hooks fail with errors that name what went wrong."""

import pytest
import torch

from conftest import CASES, random_tokens, tiny_hf_model
from hooked_attn import ActivationCache, HookedTransformer, HookPoint
from hooked_attn.utils import get_act_name

B, P = 2, 7


def documented_shapes(model: HookedTransformer) -> dict[str, tuple[int, ...]]:
    """The hook table of docs/conventions.md, written out independently of the library."""
    c = model.cfg
    shapes = {"hook_embed": (B, P, c.d_model)}
    if c.final_norm:
        shapes |= {"ln_final.hook_scale": (B, P, 1), "ln_final.hook_normalized": (B, P, c.d_model)}
    if c.embed_norm is not None:
        shapes |= {"embed_ln.hook_scale": (B, P, 1), "embed_ln.hook_normalized": (B, P, c.d_model)}
    if type(c.positions).__name__ == "LearnedPositions":
        shapes["hook_pos_embed"] = (B, P, c.d_model)
    for i in range(c.n_layers):
        b = f"blocks.{i}"
        rotary = c.rotary_at(i) is not None
        sites = ("resid_pre", "resid_post", "attn_out", "mlp_out") + (() if c.parallel_attn_mlp else ("resid_mid",))
        for site in sites:
            shapes[f"{b}.hook_{site}"] = (B, P, c.d_model)
        norms = {"pre": ("ln1", "ln2"), "post_residual": ("ln1", "ln2"), "sandwich": ("ln1", "ln2", "ln1_post", "ln2_post"),
                 "output": ("ln1_post", "ln2_post")}[c.block_norms]
        for ln in norms:
            shapes[f"{b}.{ln}.hook_scale"] = (B, P, 1)
            shapes[f"{b}.{ln}.hook_normalized"] = (B, P, c.d_model)
        shapes[f"{b}.attn.hook_q"] = (B, P, c.n_heads, c.d_head)
        shapes[f"{b}.attn.hook_k"] = shapes[f"{b}.attn.hook_v"] = (B, P, c.n_kv_heads, c.d_head)
        if c.qk_norm is not None:
            for name, n in (("q_norm", c.n_heads), ("k_norm", c.n_kv_heads)):
                shapes[f"{b}.attn.{name}.hook_scale"] = (B, P, n, 1) if c.qk_norm.over == "head" else (B, P, 1)
                shapes[f"{b}.attn.{name}.hook_normalized"] = (B, P, n, c.d_head)
        if rotary:
            shapes[f"{b}.attn.hook_rot_q"] = (B, P, c.n_heads, c.d_head)
            shapes[f"{b}.attn.hook_rot_k"] = (B, P, c.n_kv_heads, c.d_head)
        shapes[f"{b}.attn.hook_attn_scores"] = shapes[f"{b}.attn.hook_pattern"] = (B, c.n_heads, P, P)
        shapes[f"{b}.attn.hook_z"] = (B, P, c.n_heads, c.d_head)
        shapes[f"{b}.attn.hook_result"] = (B, P, c.n_heads, c.d_model)
        if c.moe is not None:
            shapes[f"{b}.mlp.hook_router_logits"] = (B, P, c.moe.n_experts)
            shapes[f"{b}.mlp.hook_expert_indices"] = shapes[f"{b}.mlp.hook_expert_weights"] = (B, P, c.moe.top_k)
        else:
            shapes[f"{b}.mlp.hook_pre"] = shapes[f"{b}.mlp.hook_post"] = (B, P, c.d_mlp)
            if c.gated_mlp:
                shapes[f"{b}.mlp.hook_pre_linear"] = (B, P, c.d_mlp)
    return shapes


@pytest.fixture(params=[c for c in CASES if c[1] in ("default", "gqa")], ids=lambda c: c[0].hf_architecture)
def model_and_tokens(request):
    arch, _, hf_cfg = request.param
    hf = tiny_hf_model(hf_cfg)
    return HookedTransformer.from_pretrained_no_processing(hf), random_tokens(hf_cfg, B, P), hf


def test_every_documented_hook_fires_once_with_its_shape(model_and_tokens):
    model, tokens, _ = model_and_tokens
    expected = documented_shapes(model)
    assert set(model.hook_dict) == set(expected)
    model.set_use_attn_result(True)
    calls: dict[str, list[tuple[int, ...]]] = {}

    def record(x, hook):
        calls.setdefault(hook.name, []).append(tuple(x.shape))

    model.run_with_hooks(tokens, fwd_hooks=[(lambda name: True, record)])
    assert calls == {name: [shape] for name, shape in expected.items()}
    assert model.n_hooks() == 0


def test_hook_result_is_opt_in_and_sums_to_attn_out(model_and_tokens):
    model, tokens, _ = model_and_tokens
    _, cache = model.run_with_cache(tokens)
    assert not any(name.endswith("hook_result") for name in cache)
    model.set_use_attn_result(True)
    _, cache = model.run_with_cache(tokens)
    attn = model.blocks[0].attn
    if model.cfg.block_norms in ("sandwich", "output"):  # attn_out is after the post-attention norm
        expected = model.blocks[0].ln1_post(cache["result", 0].sum(2) + attn.b_O)
    else:
        expected = cache["result", 0].sum(2) + attn.b_O
    torch.testing.assert_close(expected, cache["attn_out", 0], atol=1e-5, rtol=1e-5)


def test_editing_the_pattern_changes_the_logits_and_cache_sees_the_edit(model_and_tokens):
    model, tokens, _ = model_and_tokens
    clean = model(tokens)

    def uniform(pattern, hook):
        causal = torch.ones_like(pattern).tril()
        return causal / causal.sum(-1, keepdim=True)

    edited = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", uniform)])
    assert (edited - clean).abs().max() > 1e-3
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", uniform)]):
        logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(logits, edited)
    row = cache["pattern", 0][0, 0, 3]
    torch.testing.assert_close(row[:4], torch.full((4,), 0.25))
    torch.testing.assert_close(model(tokens), clean)


def test_zero_ablating_a_head_via_hook_z(model_and_tokens):
    model, tokens, _ = model_and_tokens

    def kill_head_0(z, hook):
        z = z.clone()
        z[:, :, 0] = 0
        return z

    _, clean = model.run_with_cache(tokens, names_filter="blocks.0.hook_attn_out")
    with model.hooks([("blocks.0.attn.hook_z", kill_head_0)]):
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_attn_out", "blocks.0.attn.hook_z"])
    assert torch.all(cache["z", 0][:, :, 0] == 0)
    assert not torch.allclose(cache["attn_out", 0], clean["attn_out", 0])


def test_context_manager_removes_hooks_when_the_body_raises(model_and_tokens):
    model, tokens, _ = model_and_tokens
    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x * 0)]):
            assert model.n_hooks() == 1
            raise RuntimeError("boom")
    assert model.n_hooks() == 0


def test_a_hook_that_raises_leaves_no_hooks_behind(model_and_tokens):
    model, tokens, _ = model_and_tokens
    clean = model(tokens)

    def bad(x, hook):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", bad)])
    with pytest.raises(KeyboardInterrupt):
        with model.hooks(fwd_hooks=[("hook_embed", bad)]):
            model.run_with_cache(tokens)
    assert model.n_hooks() == 0
    torch.testing.assert_close(model(tokens), clean)


def test_wrong_shape_from_a_hook_names_the_hook_and_both_shapes(model_and_tokens):
    model, tokens, _ = model_and_tokens

    def bad_shape(x, hook):
        return x[:, :-1]

    with pytest.raises(ValueError, match=r"blocks\.1\.hook_resid_post.*\(2, 6, 32\).*\(2, 7, 32\)"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_post", bad_shape)])
    with pytest.raises(ValueError, match="dtype"):
        model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda x, hook: x.double())])
    assert model.n_hooks() == 0


def test_unknown_hook_name_suggests_close_names(model_and_tokens):
    model, tokens, _ = model_and_tokens
    with pytest.raises(KeyError, match=r"blocks\.0\.attn\.hook_pattern"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_patern", lambda x, hook: x)])
    with pytest.raises(KeyError, match="unknown hook name"):
        model.run_with_cache(tokens, names_filter=["hook_embed", "not_a_hook"])
    with pytest.raises(KeyError):
        model.add_hook("blocks.9.hook_resid_pre", lambda x, hook: x)
    assert model.n_hooks() == 0


def test_a_bad_name_in_a_list_attaches_nothing(model_and_tokens):
    model, tokens, _ = model_and_tokens
    with pytest.raises(KeyError):
        with model.hooks(fwd_hooks=[("hook_embed", lambda x, hook: x), ("nope", lambda x, hook: x)]):
            pass
    assert model.n_hooks() == 0


def test_permanent_hooks_survive_reset(model_and_tokens):
    model, tokens, _ = model_and_tokens
    seen = []
    model.add_perma_hook("hook_embed", lambda x, hook: seen.append(1))
    model.add_hook("hook_embed", lambda x, hook: seen.append(2))
    model.reset_hooks()
    model(tokens)
    assert seen == [1]
    model.reset_hooks(including_permanent=True)
    model(tokens)
    assert seen == [1] and model.n_hooks() == 0


def test_two_models_do_not_share_hook_state(model_and_tokens):
    model, tokens, hf = model_and_tokens
    other = HookedTransformer.from_pretrained_no_processing(hf)
    model.add_hook("hook_embed", lambda x, hook: x * 0)
    assert other.n_hooks() == 0
    assert not torch.allclose(model(tokens), other(tokens))
    model.reset_hooks()


def test_run_with_cache_filters_devices_dtypes_and_batch_dim(model_and_tokens):
    model, tokens, _ = model_and_tokens
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    assert isinstance(cache, ActivationCache)
    assert set(cache) == {f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)}
    torch.testing.assert_close(cache["pattern", 1], cache["blocks.1.attn.hook_pattern"])
    torch.testing.assert_close(cache["pattern", 1].sum(-1), torch.ones(B, model.cfg.n_heads, P))
    _, one = model.run_with_cache(tokens[:1], names_filter="hook_embed", remove_batch_dim=True, dtype=torch.float64,
                                  device="cpu")
    assert one["hook_embed"].shape == (P, model.cfg.d_model) and one["hook_embed"].dtype == torch.float64
    with pytest.raises(KeyError, match="not in this cache"):
        cache["resid_pre", 0]


def test_backward_hooks_see_the_gradient_of_the_activation(model_and_tokens):
    model, tokens, _ = model_and_tokens
    grads = {}
    name = "blocks.1.hook_resid_pre"
    with model.hooks(bwd_hooks=[(name, lambda g, hook: grads.__setitem__(hook.name, g.clone()))]):
        logits, cache = model.run_with_cache(tokens, names_filter=name, incl_bwd="deferred")
        logits[:, -1].logsumexp(-1).sum().backward()
    assert model.n_hooks() == 0

    # The same gradient from torch.autograd.grad on the activation itself.
    captured = {}

    def keep(x, hook):
        captured["x"] = x
        return x

    out = model.run_with_hooks(tokens, fwd_hooks=[(name, keep)])
    (expected,) = torch.autograd.grad(out[:, -1].logsumexp(-1).sum(), captured["x"])
    torch.testing.assert_close(grads[name], expected)
    torch.testing.assert_close(cache[name + "_grad"], expected)


def test_get_act_name():
    assert get_act_name("pattern", 3) == "blocks.3.attn.hook_pattern"
    assert get_act_name("resid_pre", 0) == "blocks.0.hook_resid_pre"
    assert get_act_name("embed") == "hook_embed"
    assert get_act_name("scale", 2, "ln2") == "blocks.2.ln2.hook_scale"
    assert get_act_name("normalized") == "ln_final.hook_normalized"
    assert get_act_name("pre_linear", 1) == "blocks.1.mlp.hook_pre_linear"
    with pytest.raises(ValueError, match="unknown activation name"):
        get_act_name("patern", 3)
    with pytest.raises(ValueError, match="give a layer"):
        get_act_name("q")


def test_hook_point_is_identity_and_reports_itself():
    point = HookPoint()
    x = torch.randn(3)
    assert point(x) is x
    point.add_hook(lambda t, hook: t * 2)
    torch.testing.assert_close(point(x), x * 2)
    assert "1 fwd" in repr(point)  # TransformerLens' repr: name, then hook counts
    # Under the test suite's runtime type checking, beartype may refuse the Literal first.
    with pytest.raises(Exception, match="sideways"):
        point.add_hook(lambda t, hook: t, dir="sideways")


def test_editing_the_norm_scale_takes_effect_in_place_or_by_return(model_and_tokens):
    model, tokens, _ = model_and_tokens
    ln = "ln1" if hasattr(model.blocks[0], "ln1") else "ln1_post"  # "output" placement has post norms only
    name = f"blocks.0.{ln}.hook_scale"
    _, clean = model.run_with_cache(tokens, names_filter=f"blocks.0.{ln}.hook_normalized")

    def double_in_place(scale, hook):
        scale.mul_(2)

    for fn in (double_in_place, lambda scale, hook: scale * 2):
        with model.hooks([(name, fn)]):
            _, cache = model.run_with_cache(tokens, names_filter=f"blocks.0.{ln}.hook_normalized")
        expected = clean[f"blocks.0.{ln}.hook_normalized"]
        norm = getattr(model.blocks[0], ln)
        if norm.b is not None:  # halving the normalised input halves (out - b) / w
            expected = (expected - norm.b) / 2 + norm.b
        else:
            expected = expected / 2
        torch.testing.assert_close(cache[f"blocks.0.{ln}.hook_normalized"], expected, atol=1e-5, rtol=1e-5)


def test_caching_everything_works_under_inference_mode(model_and_tokens):
    model, tokens, _ = model_and_tokens
    with torch.inference_mode():
        logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(logits, model(tokens).detach())
    assert len(cache) == len(model.hook_dict) - model.cfg.n_layers  # all but the opt-in hook_result
