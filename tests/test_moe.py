"""Mixture-of-experts MLPs: the routing hooks fire with their shapes, routing is the top-k of the router,
and forcing the routing through the hooks runs exactly the chosen expert."""

import einops
import pytest
import torch
from conftest import CASES, TOL, random_tokens, tiny_hf_model

from hooked_attn import HookedTransformer
from hooked_attn.components.activations import ACTIVATIONS

B, P = 2, 7
MOE_CASES = [c for c in CASES if c[0].config_from_hf(c[2]).moe is not None]
SITES = ("router_logits", "expert_indices", "expert_weights")


@pytest.fixture(params=MOE_CASES, ids=[f"{a.hf_architecture}-{n}" for a, n, _ in MOE_CASES])
def moe_case(request):
    _, _, hf_cfg = request.param
    hf = tiny_hf_model(hf_cfg)
    return HookedTransformer.from_pretrained_no_processing(hf), random_tokens(hf_cfg, B, P), hf


def test_there_are_moe_variants_to_test():
    assert {c[0].hf_architecture for c in MOE_CASES} >= {"MixtralForCausalLM"}
    assert {c[0].config_from_hf(c[2]).moe.top_k for c in MOE_CASES} >= {1, 2}


@torch.no_grad()
def test_routing_hooks_fire_once_per_layer_with_their_shapes_and_dtypes(moe_case):
    model, tokens, _ = moe_case
    moe = model.cfg.moe
    expected = {}
    for i in range(model.cfg.n_layers):
        m = f"blocks.{i}.mlp"
        expected |= {f"{m}.hook_router_logits": ((B, P, moe.n_experts), model.dtype),
                     f"{m}.hook_expert_indices": ((B, P, moe.top_k), torch.int64),
                     f"{m}.hook_expert_weights": ((B, P, moe.top_k), torch.float32)}
    mlp_hooks = {n for n in model.hook_dict if ".mlp." in n}
    assert mlp_hooks == set(expected)  # no per-expert hook_pre / hook_pre_linear / hook_post
    calls: dict[str, list] = {}
    model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n in expected,
                                             lambda x, hook: calls.setdefault(hook.name, []).append(
                                                 (tuple(x.shape), x.dtype)))])
    assert calls == {name: [value] for name, value in expected.items()}


@torch.no_grad()
def test_chosen_experts_are_the_top_k_of_the_router_logits(moe_case):
    model, tokens, _ = moe_case
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: any(n.endswith(f"hook_{s}") for s in SITES))
    for i in range(model.cfg.n_layers):
        logits = cache[f"blocks.{i}.mlp.hook_router_logits"]
        indices = cache[f"blocks.{i}.mlp.hook_expert_indices"]
        weights = cache[f"blocks.{i}.mlp.hook_expert_weights"]
        assert torch.equal(indices, logits.topk(model.cfg.moe.top_k, dim=-1).indices)
        chosen = logits.float().softmax(-1).gather(-1, indices)
        torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True), **TOL["tiny_fp32"])
        torch.testing.assert_close(weights.sum(-1), torch.ones(B, P), **TOL["tiny_fp32"])


@torch.no_grad()
def test_router_logits_match_hf(moe_case):
    model, tokens, hf = moe_case
    ref = hf(tokens, output_router_logits=True).router_logits
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_router_logits"))
    for i in range(model.cfg.n_layers):
        torch.testing.assert_close(cache[f"blocks.{i}.mlp.hook_router_logits"].flatten(0, 1), ref[i],
                                   **TOL["tiny_fp32"])


def _expert_by_hand(model: HookedTransformer, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
    mlp = model.blocks[layer].mlp
    act = ACTIVATIONS[model.cfg.act_fn]
    gate = einops.einsum(x, mlp.W_gate[expert], "batch pos d_model, d_model d_mlp -> batch pos d_mlp")
    up = einops.einsum(x, mlp.W_in[expert], "batch pos d_model, d_model d_mlp -> batch pos d_mlp")
    return einops.einsum(act(gate) * up, mlp.W_out[expert], "batch pos d_mlp, d_mlp d_model -> batch pos d_model")


@torch.no_grad()
def test_forcing_every_token_to_one_expert_runs_that_expert(moe_case):
    model, tokens, _ = moe_case
    n_experts, top_k = model.cfg.moe.n_experts, model.cfg.moe.top_k
    names = [f"blocks.{i}.{s}" for i in range(model.cfg.n_layers) for s in ("ln2.hook_normalized", "hook_mlp_out")]
    for expert in range(n_experts):
        # The other slots point at other experts, with weight 0: only `expert` may contribute.
        others = torch.tensor([expert] + [(expert + j) % n_experts for j in range(1, top_k)])

        def force_indices(indices, hook, others=others):
            return others.expand_as(indices).clone()

        def force_weights(weights, hook):
            return torch.zeros_like(weights).index_fill_(-1, torch.tensor([0]), 1.0)

        hooks = [(lambda n: n.endswith("hook_expert_indices"), force_indices),
                 (lambda n: n.endswith("hook_expert_weights"), force_weights)]
        with model.hooks(fwd_hooks=hooks):
            _, cache = model.run_with_cache(tokens, names_filter=names)
        for i in range(model.cfg.n_layers):
            x = cache[f"blocks.{i}.ln2.hook_normalized"]
            torch.testing.assert_close(cache[f"blocks.{i}.hook_mlp_out"], _expert_by_hand(model, i, expert, x),
                                       **TOL["tiny_fp32"])


@torch.no_grad()
def test_forced_indices_take_their_renormalised_router_probabilities(moe_case):
    model, tokens, _ = moe_case
    n_experts, top_k = model.cfg.moe.n_experts, model.cfg.moe.top_k
    name = "blocks.0.mlp.hook_"
    forced = torch.arange(n_experts - top_k, n_experts).flip(0)  # the last top_k experts

    wanted = lambda n: n.startswith(name) or n in ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
    with model.hooks(fwd_hooks=[(name + "expert_indices", lambda idx, hook: forced.expand_as(idx).clone())]):
        _, cache = model.run_with_cache(tokens, names_filter=wanted)
    chosen = cache[name + "router_logits"].float().softmax(-1)[..., forced]
    weights = chosen / chosen.sum(-1, keepdim=True)
    torch.testing.assert_close(cache[name + "expert_weights"], weights, **TOL["tiny_fp32"])
    x = cache["blocks.0.ln2.hook_normalized"]
    mixed = sum(weights[..., k, None] * _expert_by_hand(model, 0, int(forced[k]), x) for k in range(top_k))
    torch.testing.assert_close(cache["blocks.0.hook_mlp_out"], mixed, **TOL["tiny_fp32"])


def test_an_out_of_range_forced_expert_is_an_error(moe_case):
    model, tokens, _ = moe_case
    n_experts = model.cfg.moe.n_experts
    with pytest.raises(ValueError, match=rf"0\.\.{n_experts - 1}"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mlp.hook_expert_indices",
                                                 lambda idx, hook: torch.full_like(idx, n_experts))])
    assert model.n_hooks() == 0


def test_gradients_flow_to_the_router_and_every_chosen_expert(moe_case):
    model, tokens, _ = moe_case
    model.zero_grad()
    model(tokens).logsumexp(-1).sum().backward()
    mlp = model.blocks[0].mlp
    assert mlp.W_router.grad is not None and mlp.W_router.grad.abs().sum() > 0
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.mlp.hook_expert_indices")
    used = cache["blocks.0.mlp.hook_expert_indices"].unique()
    for name in ("W_gate", "W_in", "W_out"):
        per_expert = getattr(mlp, name).grad.flatten(1).abs().sum(-1)
        assert torch.all(per_expert[used] > 0)


@torch.no_grad()
@pytest.mark.parametrize("case", MOE_CASES, ids=[f"{a.hf_architecture}-{n}" for a, n, _ in MOE_CASES])
def test_bf16_with_hf_routing(case):
    """bf16 rounding can flip a near-tie between experts, a discrete jump that would swamp any
    accuracy bound. So: routing must agree with HF's bf16 routing on >= 95% of decisions, and with
    HF's routing imposed (hook_expert_indices) our bf16 logits must agree with HF's bf16 top-1 and be
    no further from the fp32 truth than HF's bf16 run is (our explicit attention against HF's eager)."""
    arch, _, hf_cfg = case
    hf = tiny_hf_model(hf_cfg)
    tokens = random_tokens(hf_cfg, batch=4, n_pos=16)
    truth = hf(tokens).logits.log_softmax(-1)
    model = HookedTransformer.from_pretrained_no_processing(hf, dtype=torch.bfloat16)
    hf16 = hf.to(torch.bfloat16)
    ref = hf16(tokens, output_router_logits=True)
    k = hf_cfg.num_experts_per_tok
    hf_choice = [logits.float().softmax(-1).topk(k, dim=-1).indices.reshape(*tokens.shape, k)
                 for logits in ref.router_logits]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_expert_indices"))
    agree = torch.stack([(cache["blocks.%d.mlp.hook_expert_indices" % i].sort(-1).values == c.sort(-1).values).all(-1)
                         for i, c in enumerate(hf_choice)]).float().mean().item()
    assert agree >= 0.95, f"routing agreement with HF bf16 is {agree:.3f}"
    pins = [(f"blocks.{i}.mlp.hook_expert_indices", lambda idx, hook, c=c: c.to(idx.dtype))
            for i, c in enumerate(hf_choice)]
    # Like with like: a no-op hook on the pattern selects our explicit attention, as HF eager's.
    explicit = (lambda n: n.endswith("hook_pattern"), lambda pattern, hook: None)
    ours = model.run_with_hooks(tokens, fwd_hooks=[*pins, explicit])
    top1 = (ours.argmax(-1) == ref.logits.argmax(-1)).float().mean().item()
    assert top1 >= 0.95, f"top-1 agreement with HF bf16 is {top1:.3f}"
    our_err = (ours.float().log_softmax(-1) - truth).abs().max().item()
    hf_err = (ref.logits.float().log_softmax(-1) - truth).abs().max().item()
    assert our_err <= 1.5 * hf_err + 0.02, f"bf16 error vs fp32: ours {our_err:.4f}, HF's {hf_err:.4f}"
