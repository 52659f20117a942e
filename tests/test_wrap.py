"""wrap()/unwrap(): hooked nn.MultiheadAttention matches torch, in every module that uses it."""

import copy

import jaxtyping
import pytest
import torch
import torch.nn.functional as F
from conftest import TOL
from torch import nn

from hooked_attn import HookedRootModule, HookPoint, unwrap, wrap
from hooked_attn.wrap import HookedMultiheadAttention, WrappedModule

E, H, N, L, S = 8, 2, 3, 4, 5  # embed_dim, heads, batch, query positions, key positions

MODULES = {
    "default": {},
    "batch_first": {"batch_first": True},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "bias_kv_zero_attn_batch_first": {"add_bias_kv": True, "add_zero_attn": True, "batch_first": True},
    "kdim_vdim": {"kdim": 5, "vdim": 3},
    "kdim_vdim_batch_first_bias_kv": {"kdim": 6, "vdim": 4, "batch_first": True, "add_bias_kv": True},
}
CALLS = ["plain", "self_attention", "bool_attn_mask_2d", "float_attn_mask_3d", "bool_key_padding",
         "float_key_padding", "both_masks", "is_causal", "is_causal_key_padding", "unbatched"]


@pytest.fixture
def no_runtime_typecheck(monkeypatch):
    """Let the library's own input checks speak (the test run's jaxtyping checks would answer first)."""
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)


def make_mha(seed: int = 0, **kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, **kwargs).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_(0.0, 0.5)  # torch zero-initialises biases, which would hide a dropped bias
    return mha


def make_call(mha: nn.MultiheadAttention, call: str, seed: int = 1) -> tuple[tuple, dict]:
    """Positional (query, key, value) and keyword arguments for one kind of call."""
    gen = torch.Generator().manual_seed(seed)
    n_keys = L if call.startswith(("self_attention", "is_causal")) else S

    def seq(n: int, width: int, batched: bool = True):
        shape = ((N, n) if mha.batch_first else (n, N)) if batched else (n,)
        return torch.randn(*shape, width, generator=gen)

    batched = call != "unbatched"
    query, key, value = seq(L, E, batched), seq(n_keys, mha.kdim, batched), seq(n_keys, mha.vdim, batched)
    if call == "self_attention":
        key = value = query
    padding = torch.rand(N, n_keys, generator=gen) < 0.4
    padding[:, 0] = False  # every query keeps a key: torch's reference gives NaN otherwise
    causal = torch.ones(L, n_keys, dtype=torch.bool).triu(1)
    kwargs = {
        "plain": {}, "self_attention": {}, "unbatched": {"key_padding_mask": padding[0]},
        "bool_attn_mask_2d": {"attn_mask": causal},
        "float_attn_mask_3d": {"attn_mask": torch.randn(N * H, L, n_keys, generator=gen)},
        "bool_key_padding": {"key_padding_mask": padding},
        "float_key_padding": {"key_padding_mask": padding.float() * -1e4},
        "both_masks": {"attn_mask": causal, "key_padding_mask": padding},
        "is_causal": {"attn_mask": causal, "is_causal": True},
        "is_causal_key_padding": {"attn_mask": causal, "key_padding_mask": padding, "is_causal": True},
    }[call]
    return (query, key, value), kwargs


# query is key is value (self-attention) needs kdim == vdim == embed_dim.
EQUIVALENCE_CASES = [(config, call) for config in MODULES for call in CALLS
                     if not (call == "self_attention" and "kdim" in MODULES[config])]


@pytest.mark.parametrize(("config", "call"), EQUIVALENCE_CASES, ids=[f"{c}-{k}" for c, k in EQUIVALENCE_CASES])
def test_outputs_and_weights_match_torch(config: str, call: str) -> None:
    mha = make_mha(**MODULES[config])
    reference = copy.deepcopy(mha)
    args, kwargs = make_call(mha, call)
    wrapped = wrap(mha)
    for grad in (True, False):  # no_grad lets torch take its fused fast path where it can
        with torch.set_grad_enabled(grad):
            for need_weights, average in ((True, True), (True, False), (False, True)):
                options = dict(kwargs, need_weights=need_weights, average_attn_weights=average)
                expected, expected_weights = reference(*args, **options)
                out, weights = wrapped(*args, **options)
                torch.testing.assert_close(out, expected, **TOL["tiny_fp32"])
                if need_weights:
                    torch.testing.assert_close(weights, expected_weights, **TOL["tiny_fp32"])
                else:
                    assert weights is None


@pytest.mark.parametrize("batch_first", [False, True])
def test_hooks_show_batch_first_activations_that_recompute_the_output(batch_first: bool) -> None:
    mha = make_mha(batch_first=batch_first)
    (query, key, value), kwargs = make_call(mha, "both_masks")
    wrapped = wrap(mha)
    assert sorted(wrapped.hook_dict) == sorted(
        f"hook_{s}" for s in ("q", "k", "v", "attn_scores", "pattern", "z", "result"))
    (out, _), cache = wrapped.run_with_cache(query, key, value, need_weights=False, **kwargs)
    assert set(cache) == {"hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z"}
    assert cache["hook_q"].shape == (N, L, H, E // H)
    assert cache["hook_k"].shape == cache["hook_v"].shape == (N, S, H, E // H)
    assert cache["hook_attn_scores"].shape == cache["hook_pattern"].shape == (N, H, L, S)
    assert cache["hook_z"].shape == (N, L, H, E // H)

    forbidden = kwargs["attn_mask"][None, None] | kwargs["key_padding_mask"][:, None, None, :]
    pattern, scores = cache["hook_pattern"], cache["hook_attn_scores"]
    assert (pattern[forbidden.expand_as(pattern)] == 0).all()  # exactly zero, not just small
    assert torch.isneginf(scores[forbidden.expand_as(scores)]).all()
    torch.testing.assert_close(pattern.sum(-1), torch.ones(N, H, L), **TOL["tiny_fp32"])
    # The hooked tensors are the real intermediates: recompute scores, z and the output from them.
    raw = torch.einsum("bqhd,bkhd->bhqk", cache["hook_q"], cache["hook_k"]) / (E // H) ** 0.5
    torch.testing.assert_close(scores[~forbidden.expand_as(scores)], raw[~forbidden.expand_as(raw)], **TOL["tiny_fp32"])
    torch.testing.assert_close(cache["hook_z"], torch.einsum("bhqk,bkhd->bqhd", pattern, cache["hook_v"]),
                               **TOL["tiny_fp32"])
    recomputed = F.linear(cache["hook_z"].flatten(-2), mha.out_proj.weight, mha.out_proj.bias)
    torch.testing.assert_close(out, recomputed if batch_first else recomputed.transpose(0, 1), **TOL["tiny_fp32"])


def test_hook_result_is_opt_in_and_sums_to_the_output() -> None:
    wrapped = wrap(make_mha(batch_first=True))
    (query, key, value), _ = make_call(wrapped.module, "plain")
    _, cache = wrapped.run_with_cache(query, key, value)
    assert "hook_result" not in cache
    out, cache = wrapped.run_with_cache(query, key, value, names_filter=["hook_result"])
    assert cache["hook_result"].shape == (N, L, H, E)
    torch.testing.assert_close(cache["hook_result"].sum(2) + wrapped.module.out_proj.bias, out[0], **TOL["tiny_fp32"])
    wrapped.set_use_attn_result(True)
    _, cache = wrapped.run_with_cache(query, key, value)
    assert "hook_result" in cache


def test_parameters_are_shared_and_the_state_dict_is_unchanged() -> None:
    mha = make_mha(add_bias_kv=True)
    keys, params = list(mha.state_dict()), dict(mha.named_parameters())
    reference = copy.deepcopy(mha)
    wrapped = wrap(mha)
    hooked = wrapped.module
    assert isinstance(hooked, HookedMultiheadAttention) and hooked.original is mha
    for name, param in params.items():
        assert dict(hooked.named_parameters())[name] is param
    assert hooked.in_proj_weight is mha.in_proj_weight and hooked.out_proj is mha.out_proj
    assert list(hooked.state_dict()) == keys
    # Gradients reach the original parameters and equal torch's own.
    (query, key, value), kwargs = make_call(mha, "both_masks")
    reference(query, key, value, **kwargs)[0].square().sum().backward()
    wrapped(query, key, value, **kwargs)[0].square().sum().backward()
    for name, param in reference.named_parameters():
        torch.testing.assert_close(params[name].grad, param.grad, **TOL["tiny_fp32"])


def test_run_with_hooks_ablates_a_head_and_patterns_can_be_edited() -> None:
    wrapped = wrap(make_mha())
    (query, key, value), _ = make_call(wrapped.module, "plain")
    (clean, _), cache = wrapped.run_with_cache(query, key, value, need_weights=False)

    def zero_head_0(z, hook):
        z = z.clone()
        z[:, :, 0] = 0.0
        return z

    ablated, _ = wrapped.run_with_hooks(query, key, value, need_weights=False, fwd_hooks=[("hook_z", zero_head_0)])
    z = zero_head_0(cache["hook_z"], None)
    expected = F.linear(z.flatten(-2), wrapped.module.out_proj.weight, wrapped.module.out_proj.bias).transpose(0, 1)
    torch.testing.assert_close(ablated, expected, **TOL["tiny_fp32"])
    assert not torch.allclose(ablated, clean)
    assert wrapped.n_hooks() == 0

    # A hook on the pattern (with need_weights=False: the fused path must give way) changes the output.
    uniform = lambda pattern, hook: torch.full_like(pattern, 1.0 / pattern.shape[-1])
    flat, _ = wrapped.run_with_hooks(query, key, value, need_weights=False, fwd_hooks=[("hook_pattern", uniform)])
    mean_v = cache["hook_v"].mean(1, keepdim=True).expand(-1, L, -1, -1)
    expected = F.linear(mean_v.flatten(-2), wrapped.module.out_proj.weight, wrapped.module.out_proj.bias)
    torch.testing.assert_close(flat, expected.transpose(0, 1), **TOL["tiny_fp32"])


def test_a_query_with_no_visible_key_gets_a_zero_pattern_row() -> None:
    mha = make_mha()
    reference = copy.deepcopy(mha)
    (query, key, value), _ = make_call(mha, "plain")
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[1] = True  # sequence 1 has no key at all
    expected, _ = reference(query, key, value, key_padding_mask=padding, need_weights=False)
    out, cache = wrap(mha).run_with_cache(query, key, value, key_padding_mask=padding)
    assert (cache["hook_pattern"][1] == 0).all() and not cache["hook_pattern"].isnan().any()
    torch.testing.assert_close(out[0], expected, **TOL["tiny_fp32"])  # torch's need_weights=False: zeros too
    torch.testing.assert_close(out[0][:, 1], mha.out_proj.bias.expand(L, E), **TOL["tiny_fp32"])
    # The one deliberate difference: torch's need_weights=True path gives NaN for such a query.
    assert reference(query, key, value, key_padding_mask=padding)[1][1].isnan().all()


def test_dropout_follows_the_training_flag() -> None:
    mha = make_mha(dropout=0.5)
    reference = copy.deepcopy(mha)
    (query, key, value), _ = make_call(mha, "plain")
    wrapped = wrap(mha).train()
    assert mha.training is False and wrapped.module.training is True  # the original is untouched until unwrap
    (first, weights), cache = wrapped.run_with_cache(query, key, value, average_attn_weights=False)
    second, _ = wrapped(query, key, value)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(cache["hook_pattern"].sum(-1), torch.ones(N, H, L), **TOL["tiny_fp32"])
    assert ((weights == 0) | torch.isclose(weights, 2 * cache["hook_pattern"])).all()  # dropped, rest scaled 1/(1-p)
    wrapped.eval()
    torch.testing.assert_close(wrapped(query, key, value)[0], reference(query, key, value)[0], **TOL["tiny_fp32"])
    assert unwrap(wrapped) is mha and mha.training is False


def encoder(batch_first: bool = True, norm_first: bool = False) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=batch_first,
                                       norm_first=norm_first)
    # Nested tensors only where torch supports them (it warns otherwise).
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=batch_first and not norm_first)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # torch's own fast path, before wrap
def test_transformer_encoder_fast_paths_give_way_to_the_hooks(monkeypatch) -> None:
    model = encoder()
    x = torch.randn(N, L, E)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[0, 2:] = padding[2, 3:] = True  # left-aligned: torch's nested-tensor path applies
    fused_calls = []
    fused = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a: fused_calls.append(1) or fused(*a))
    with torch.no_grad():
        fast_plain, fast_padded = model(x), model(x, src_key_padding_mask=padding)
        assert len(fused_calls) == 4  # both layers, both calls: the fused path really ran
        assert (fast_padded[padding] == 0).all()  # the nested-tensor path zeroes padded positions
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow_padded = model(x, src_key_padding_mask=padding)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)

    wrapped = wrap(model)
    assert model.use_nested_tensor is False
    with torch.no_grad():
        plain, cache = wrapped.run_with_cache(x, names_filter=lambda n: n.endswith("hook_pattern"))
        padded, padded_cache = wrapped.run_with_cache(x, src_key_padding_mask=padding)
    assert len(fused_calls) == 4  # not called again
    torch.testing.assert_close(plain, fast_plain, **TOL["tiny_fp32"])
    torch.testing.assert_close(padded, slow_padded, **TOL["tiny_fp32"])
    torch.testing.assert_close(padded[~padding], fast_padded[~padding], **TOL["tiny_fp32"])
    assert list(cache) == ["layers.0.self_attn.hook_pattern", "layers.1.self_attn.hook_pattern"]
    for layer in (0, 1):
        pattern = padded_cache[f"layers.{layer}.self_attn.hook_pattern"]
        assert pattern.shape == (N, H, L, L)
        assert (pattern[padding[:, None, None, :].expand_as(pattern)] == 0).all()
    # Calling the model itself (not the wrapper) also runs the hooks, still off the fast path.
    seen = []
    with wrapped.hooks([("layers.1.self_attn.hook_z", lambda z, hook: seen.append(z.shape))]), torch.no_grad():
        model(x, src_key_padding_mask=padding)
    assert seen == [(N, L, H, E // H)] and len(fused_calls) == 4

    assert unwrap(wrapped) is model and model.use_nested_tensor is True
    with torch.no_grad():
        torch.testing.assert_close(model(x), fast_plain, rtol=0, atol=0)
    assert len(fused_calls) == 6


@pytest.mark.parametrize("norm_first", [False, True])
def test_sequence_first_encoder_with_causal_mask(norm_first: bool) -> None:
    model = encoder(batch_first=False, norm_first=norm_first)
    x = torch.randn(L, N, E)
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    expected = model(x, mask=mask, is_causal=True)
    wrapped = wrap(model)
    out, cache = wrapped.run_with_cache(x, mask=mask, is_causal=True)
    torch.testing.assert_close(out, expected, **TOL["tiny_fp32"])
    pattern = cache["layers.0.self_attn.hook_pattern"]
    assert pattern.shape == (N, H, L, L) and (pattern.triu(1) == 0).all()


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")  # nn.Transformer's sequence-first encoder
def test_transformer_cross_attention_reads_memory() -> None:
    torch.manual_seed(0)
    model = nn.Transformer(E, H, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=16, dropout=0.0).eval()
    src, tgt = torch.randn(S, N, E), torch.randn(L, N, E)
    memory_padding = torch.zeros(N, S, dtype=torch.bool)
    memory_padding[1, 3:] = True
    inputs = {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(L), "src_key_padding_mask": memory_padding,
                  "memory_key_padding_mask": memory_padding}
    expected = model(src, tgt, **inputs)
    wrapped = wrap(model)
    assert wrapped.attention_paths == ["encoder.layers.0.self_attn", "decoder.layers.0.self_attn",
                                       "decoder.layers.0.multihead_attn", "decoder.layers.1.self_attn",
                                       "decoder.layers.1.multihead_attn"]
    out, cache = wrapped.run_with_cache(src, tgt, **inputs)
    torch.testing.assert_close(out, expected, **TOL["tiny_fp32"])
    cross = cache["decoder.layers.1.multihead_attn.hook_pattern"]
    assert cross.shape == (N, H, L, S)  # queries from the target, keys from the memory
    assert (cross[1, :, :, 3:] == 0).all()
    assert cache["decoder.layers.1.multihead_attn.hook_q"].shape == (N, L, H, E // H)
    assert cache["decoder.layers.1.multihead_attn.hook_k"].shape == (N, S, H, E // H)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
def test_unwrap_restores_the_original_objects() -> None:
    torch.manual_seed(0)
    model = nn.Transformer(E, H, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16, dropout=0.0).eval()
    originals = {name: m for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    src, tgt = torch.randn(S, N, E), torch.randn(L, N, E)
    expected = model(src, tgt)
    wrapped = wrap(model)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert unwrap(wrapped) is model
    assert {name: m for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)} == originals
    assert all(type(m) is nn.MultiheadAttention for m in originals.values())
    assert not any(isinstance(m, (HookedMultiheadAttention, HookPoint)) for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    torch.testing.assert_close(model(src, tgt), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="unwrapped"):
        wrapped(src, tgt)
    with pytest.raises(ValueError, match="unwrapped already"):
        unwrap(wrapped)
    rewrapped = wrap(model)  # wrapping again after unwrap is fine
    torch.testing.assert_close(rewrapped(src, tgt), expected, **TOL["tiny_fp32"])


def test_unwrap_carries_over_parameters_replaced_on_the_hooked_module() -> None:
    mha = make_mha()
    wrapped = wrap(mha)
    new_weight = nn.Parameter(torch.randn(3 * E, E))
    wrapped.load_state_dict({**wrapped.state_dict(), "module.in_proj_weight": new_weight}, assign=True)
    assert unwrap(wrapped) is mha and mha.in_proj_weight is new_weight


def test_a_shared_attention_module_is_hooked_at_both_places_and_restored() -> None:
    shared = make_mha(batch_first=True)
    model = nn.ModuleDict({"first": shared, "second": shared})
    wrapped = wrap(model)
    assert model["first"] is model["second"] and isinstance(model["first"], HookedMultiheadAttention)
    assert wrapped.attention_paths == ["first", "second"]
    assert "first.hook_pattern" in wrapped.hook_dict and "second.hook_pattern" not in wrapped.hook_dict
    assert unwrap(wrapped) is model and model["first"] is shared and model["second"] is shared


def test_wrapping_the_attention_module_itself() -> None:
    mha = make_mha()
    wrapped = wrap(mha)
    assert "hook_pattern" in wrapped.hook_dict and wrapped.attention_paths == []
    assert unwrap(wrapped) is mha


def test_tabular_transformer_patterns_per_head_sum_to_one() -> None:
    """A TabPFN-style model: each cell attends across the row's features, then across the training rows."""

    class TabularLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn_between_features = nn.MultiheadAttention(E, H, batch_first=True)
            self.attn_between_items = nn.MultiheadAttention(E, H, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(E, 2 * E), nn.GELU(), nn.Linear(2 * E, E))
            self.norms = nn.ModuleList(nn.LayerNorm(E) for _ in range(3))

        def forward(self, x: torch.Tensor, n_train: int) -> torch.Tensor:  # x [batch item feature d_model]
            batch, n_items, n_features, _ = x.shape
            rows = x.reshape(batch * n_items, n_features, E)
            x = self.norms[0](x + self.attn_between_features(rows, rows, rows)[0].reshape(x.shape))
            cols = x.transpose(1, 2).reshape(batch * n_features, n_items, E)
            train = cols[:, :n_train]  # every item, train or test, attends to the training items only
            mixed = self.attn_between_items(cols, train, train, need_weights=False)[0]
            x = self.norms[1](x + mixed.reshape(batch, n_features, n_items, E).transpose(1, 2))
            return self.norms[2](x + self.mlp(x))

    class TabularModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(1, E)
            self.layers = nn.ModuleList(TabularLayer() for _ in range(2))
            self.head = nn.Linear(E, 3)

        def forward(self, table: torch.Tensor, n_train: int) -> torch.Tensor:  # table [batch item feature]
            x = self.embed(table[..., None])
            for layer in self.layers:
                x = layer(x, n_train)
            return self.head(x[:, n_train:].mean(2))  # class logits for the test items

    torch.manual_seed(0)
    model = TabularModel().eval()
    table, n_train = torch.randn(2, 7, 4), 5  # 2 tables, 7 items (5 train, 2 test), 4 features
    expected = model(table, n_train)
    out, cache = wrap(model).run_with_cache(table, n_train, names_filter=lambda n: n.endswith("hook_pattern"))
    torch.testing.assert_close(out, expected, **TOL["tiny_fp32"])
    assert len(cache) == 4
    for layer in (0, 1):
        features = cache[f"layers.{layer}.attn_between_features.hook_pattern"]
        items = cache[f"layers.{layer}.attn_between_items.hook_pattern"]
        assert features.shape == (2 * 7, H, 4, 4)  # [batch*item head q_pos=feature k_pos=feature]
        assert items.shape == (2 * 4, H, 7, n_train)  # [batch*feature head q_pos=item k_pos=train item]
        for pattern in (features, items):
            for head in range(H):
                torch.testing.assert_close(pattern[:, head].sum(-1), torch.ones(pattern.shape[0], pattern.shape[2]),
                                           **TOL["tiny_fp32"])


def test_wrap_errors_leave_the_module_unchanged() -> None:
    mha = make_mha()
    wrapped = wrap(mha)
    with pytest.raises(ValueError, match="already wrapped"):
        wrap(wrapped)
    model = nn.Sequential(nn.Linear(E, E), make_mha())
    wrap(model)
    with pytest.raises(ValueError, match="'1' is already a HookedMultiheadAttention"):
        wrap(model)
    # No attention module: wrap accepts it (its SDPA calls are found by running it); this one makes none.
    plain_model = wrap(nn.Sequential(nn.Linear(E, E)))
    assert plain_model.discover(torch.randn(2, E)).hook_dict == {} and plain_model.attention_layers == []

    class Rooted(HookedRootModule):
        def __init__(self) -> None:
            super().__init__()
            self.hook_x = HookPoint()
            self.setup()

    with pytest.raises(ValueError, match="already a HookedRootModule"):
        wrap(Rooted())
    with pytest.raises(ValueError, match="'inner' is a Rooted"):
        wrap(nn.ModuleDict({"inner": Rooted()}))


def test_unwrap_errors(no_runtime_typecheck) -> None:
    with pytest.raises(TypeError, match="got Linear"):
        unwrap(nn.Linear(2, 2))
    model = nn.ModuleDict({"attn": make_mha()})
    wrapped = wrap(model)
    with pytest.raises(TypeError, match="pass the WrappedModule itself"):
        unwrap(wrapped.module)
    hooked = model["attn"]
    model["attn"] = nn.Identity()
    with pytest.raises(ValueError, match="'attn' is no longer a HookedMultiheadAttention"):
        unwrap(wrapped)
    model["attn"] = hooked
    assert isinstance(unwrap(wrapped), nn.ModuleDict) and type(model["attn"]) is nn.MultiheadAttention


def test_bad_inputs_raise_errors_that_name_them(no_runtime_typecheck) -> None:
    wrapped = wrap(make_mha())
    (query, key, value), _ = make_call(wrapped.module, "plain")
    with pytest.raises(ValueError, match=r"attn_mask must be \[q_pos k_pos\] = \(4, 5\).*got \(5, 5\)"):
        wrapped(query, key, value, attn_mask=torch.zeros(S, S, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[batch k_pos\] = \(3, 5\)"):
        wrapped(query, key, value, key_padding_mask=torch.zeros(N, L, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be bool .* or float .*got torch.int64"):
        wrapped(query, key, value, attn_mask=torch.zeros(L, S, dtype=torch.long))
    with pytest.raises(ValueError, match="is_causal=True needs attn_mask"):
        wrapped(query, key, value, is_causal=True)
    with pytest.raises(ValueError, match="key must have last dimension 8"):
        wrapped(query, key[..., :4], value)
    with pytest.raises(ValueError, match="different batch sizes"):
        wrapped(query, key[:, :2], value[:, :2])
    with pytest.raises(ValueError, match="NestedTensor"):
        nested = torch.nested.nested_tensor([torch.randn(2, E), torch.randn(3, E)])
        wrapped(nested, nested, nested)


def test_wrapped_module_type() -> None:
    wrapped = wrap(nn.ModuleDict({"attn": make_mha()}))
    assert isinstance(wrapped, WrappedModule) and isinstance(wrapped, HookedRootModule)
    assert wrapped.hook_dict["attn.hook_q"].name == "attn.hook_q"
