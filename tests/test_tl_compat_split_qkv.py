"""Split attention inputs (``use_split_qkv_input``: ``hook_q_input``/``hook_k_input``/``hook_v_input``),
``hook_mlp_in`` and ungrouped grouped-query attention, on TransformerLens-config models and on a model built from HF Llama.

The yardsticks: per-head projections written out here with plain torch ops, and the unsplit forward
(splitting changes no output until a hook edits one head's input).
"""

import einops
import pytest
import torch
import torch.nn.functional as F
import transformers

from hooked_attn import HookedTransformer as CoreModel
from hooked_attn.architectures import REGISTRY
from hooked_attn.components.kv_cache import KVCache
from tests.conftest import TOL


def tl_model(tl, n_kv_heads: int | None, **kw):
    args = dict(n_layers=2, d_model=16, d_head=4, n_heads=4, n_key_value_heads=n_kv_heads, n_ctx=16, d_vocab=29,
                act_fn="silu", seed=0) | kw
    model = tl.HookedTransformer(tl.HookedTransformerConfig(**args))
    with torch.no_grad():  # TL's init leaves biases and norm gains trivial: make every term count
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("b_Q", "b_K", "b_V", "w", "b"):
                param.add_(0.3 * torch.randn_like(param))
    return model


def llama_gqa() -> CoreModel:
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(REGISTRY["LlamaForCausalLM"].tiny_hf_configs()["gqa"])
    return CoreModel.from_pretrained_no_processing(hf.eval())


TOKENS = torch.randint(0, 29, (2, 7), generator=torch.Generator().manual_seed(5))
SHAPE_NAMES = ["blocks.0.hook_q_input", "blocks.0.hook_k_input", "blocks.0.hook_v_input", "blocks.0.attn.hook_k",
               "blocks.0.attn.hook_v"]


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
def test_split_inputs_have_per_head_shapes_and_change_no_output(tl, n_kv_heads):
    model = tl_model(tl, n_kv_heads)
    plain = model(TOKENS)
    before = set(model.hook_dict)
    model.set_use_split_qkv_input(True)
    assert set(model.hook_dict) - before == {f"blocks.{i}.hook_{x}_input" for i in range(2) for x in "qkv"}
    assert model.cfg.use_split_qkv_input is True
    logits, cache = model.run_with_cache(TOKENS)  # caching everything includes the switched-on points
    kv = n_kv_heads or 4
    assert cache["blocks.1.hook_q_input"].shape == (2, 7, 4, 16)
    assert cache["blocks.1.hook_k_input"].shape == cache["blocks.1.hook_v_input"].shape == (2, 7, kv, 16)
    torch.testing.assert_close(cache["blocks.1.hook_k_input"][:, :, -1], cache["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(logits, plain, **TOL["tiny_fp32"])
    torch.testing.assert_close(model(TOKENS), plain, **TOL["tiny_fp32"])  # fused attention on split inputs
    with model.hooks([("blocks.0.hook_v_input", lambda x, hook: None)]):
        with pytest.raises(ValueError, match="remove the hooks"):
            model.set_use_split_qkv_input(False)
        assert model.blocks[0].use_split_qkv_input and "blocks.1.hook_q_input" in model.hook_dict  # unchanged
    model.set_use_split_qkv_input(False)
    assert set(model.hook_dict) == before and not hasattr(model.blocks[0], "hook_q_input")


def test_ungrouping_repeats_keys_values_and_their_inputs_per_query_head(tl):
    """TransformerLens' test_ungroup_grouped_query_attention_flag_changes_k_v_hooks_shape, with the
    values checked too: ungrouped, each K/V head is repeated to the query heads it serves."""
    model = tl_model(tl, 2, use_split_qkv_input=True)
    grouped_out, grouped = model.run_with_cache(TOKENS, names_filter=SHAPE_NAMES)
    model.set_ungroup_grouped_query_attention(True)
    assert model.cfg.ungroup_grouped_query_attention is True
    out, ungrouped = model.run_with_cache(TOKENS, names_filter=SHAPE_NAMES)
    for name in SHAPE_NAMES[1:]:
        assert grouped[name].shape[2] == 2 and ungrouped[name].shape[2] == 4, name
        torch.testing.assert_close(ungrouped[name], grouped[name].repeat_interleave(2, dim=2), **TOL["tiny_fp32"])
    torch.testing.assert_close(out, grouped_out, **TOL["tiny_fp32"])


def ln1(model, x):
    return F.layer_norm(x, (16,), model.blocks[0].ln1.w, model.blocks[0].ln1.b, model.cfg.eps)


@pytest.mark.parametrize("ungroup", [False, True], ids=["grouped", "ungrouped"])
def test_patching_one_heads_key_input_changes_that_heads_keys_only(tl, ungroup):
    model = tl_model(tl, 2, use_split_qkv_input=True)
    model.set_ungroup_grouped_query_attention(ungroup)
    head = 1  # a K/V head when grouped, a query head when ungrouped
    served = [2, 3] if not ungroup else [1]  # the query heads whose scores read that head's keys
    noise = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(6))

    def patch(k_input, hook):
        k_input = k_input.clone()
        k_input[:, :, head] = noise
        return k_input

    names = ["blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v", "blocks.0.attn.hook_pattern"]
    _, clean = model.run_with_cache(TOKENS, names_filter=names)
    with model.hooks([("blocks.0.hook_k_input", patch)]):
        _, patched = model.run_with_cache(TOKENS, names_filter=names)
    attn = model.blocks[0].attn
    W_K, b_K = (attn.W_K, attn.b_K) if not ungroup else (attn.W_K.repeat_interleave(2, 0), attn.b_K.repeat_interleave(2, 0))
    expected = einops.einsum(ln1(model, noise), W_K[head], "batch pos d_model, d_model d_head -> batch pos d_head")
    torch.testing.assert_close(patched["blocks.0.attn.hook_k"][:, :, head], expected + b_K[head], **TOL["tiny_fp32"])
    others = [h for h in range(clean["blocks.0.attn.hook_k"].shape[2]) if h != head]
    assert torch.equal(patched["blocks.0.attn.hook_k"][:, :, others], clean["blocks.0.attn.hook_k"][:, :, others])
    for name in ("blocks.0.attn.hook_q", "blocks.0.attn.hook_v"):
        assert torch.equal(patched[name], clean[name]), name
    pattern_moved = (patched["blocks.0.attn.hook_pattern"] - clean["blocks.0.attn.hook_pattern"]).abs().amax((0, 2, 3))
    assert (pattern_moved[served] > 1e-3).all() and (pattern_moved[[h for h in range(4) if h not in served]] == 0).all()


def test_split_query_input_is_projected_per_head(tl):
    model = tl_model(tl, None, use_split_qkv_input=True)
    noise = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(7))

    def patch(q_input, hook):
        return torch.cat([q_input[:, :, :3], noise[:, :, None]], dim=2)

    with model.hooks([("blocks.0.hook_q_input", patch)]):
        _, cache = model.run_with_cache(TOKENS, names_filter="blocks.0.attn.hook_q")
    attn = model.blocks[0].attn
    expected = einops.einsum(ln1(model, noise), attn.W_Q[3], "batch pos d_model, d_model d_head -> batch pos d_head")
    torch.testing.assert_close(cache["blocks.0.attn.hook_q"][:, :, 3], expected + attn.b_Q[3], **TOL["tiny_fp32"])


def test_split_and_ungrouped_on_a_model_from_hf_llama_keep_its_logits_and_kv_cache():
    model = llama_gqa()
    tokens = torch.randint(0, 101, (1, 9), generator=torch.Generator().manual_seed(8))
    plain = model(tokens)
    model.set_use_split_qkv_input(True)
    model.set_ungroup_grouped_query_attention(True)
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_k_input", "blocks.1.attn.hook_rot_k"])
    assert cache["blocks.1.hook_k_input"].shape == (1, 9, 4, 32) and cache["blocks.1.attn.hook_rot_k"].shape[2] == 4
    torch.testing.assert_close(model(tokens), plain, **TOL["tiny_fp32"])
    kv = KVCache.empty(2)
    steps = [model(tokens[:, :6], past_kv_cache=kv), model(tokens[:, 6:], past_kv_cache=kv)]
    torch.testing.assert_close(torch.cat(steps, dim=1), plain, **TOL["tiny_fp32"])
    model.set_ungroup_grouped_query_attention(False)  # the cache holds a K/V entry per query head now
    with pytest.raises(ValueError, match="made by another model"):
        model(tokens[:, :1], past_kv_cache=kv)


@pytest.mark.parametrize(("arch", "variant"), [("Qwen3ForCausalLM", "default"), ("Olmo2ForCausalLM", "gqa"),
                                             ("Gemma3ForCausalLM", "default"), ("GPT2LMHeadModel", "default")])
def test_split_and_ungrouped_keep_the_logits_across_norm_placements_and_qk_norms(arch, variant):
    """Per-head q/k norms (Qwen3, Gemma 3), a norm over all heads (OLMo-2, with no pre-norm), sandwich norms."""
    torch.manual_seed(0)
    hf_cfg = REGISTRY[arch].tiny_hf_configs()[variant]
    model = CoreModel.from_pretrained_no_processing(transformers.AutoModelForCausalLM.from_config(hf_cfg).eval())
    tokens = torch.randint(0, hf_cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(9))
    plain = model(tokens)
    model.set_use_split_qkv_input(True)
    model.set_ungroup_grouped_query_attention(True)
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_k_input", "blocks.0.attn.hook_k"])
    assert cache["blocks.0.hook_k_input"].shape[2] == cache["blocks.0.attn.hook_k"].shape[2] == model.cfg.n_heads
    torch.testing.assert_close(model(tokens), plain, **TOL["tiny_fp32"])


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_hook_mlp_in_edits_the_mlp_input_only(tl, parallel):
    model = tl_model(tl, None, use_hook_mlp_in=True, act_fn="relu", parallel_attn_mlp=parallel)
    assert model.cfg.use_hook_mlp_in is True
    plain, cache = model.run_with_cache(TOKENS)
    read = "blocks.0.hook_resid_pre" if parallel else "blocks.0.hook_resid_mid"
    assert torch.equal(cache["blocks.0.hook_mlp_in"], cache[read])
    edit = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(10))

    def replace_in_place(mlp_in, hook):
        mlp_in.copy_(edit)  # in place: must not reach the residual stream

    names = ["blocks.0.hook_mlp_out", read, "blocks.0.hook_attn_out", "blocks.0.hook_resid_post"]
    with model.hooks([("blocks.0.hook_mlp_in", replace_in_place)]):
        _, patched = model.run_with_cache(TOKENS, names_filter=names)
    mlp, ln2 = model.blocks[0].mlp, model.blocks[0].ln2
    expected = F.relu(F.layer_norm(edit, (16,), ln2.w, ln2.b, model.cfg.eps) @ mlp.W_in + mlp.b_in) @ mlp.W_out
    torch.testing.assert_close(patched["blocks.0.hook_mlp_out"], expected + mlp.b_out, **TOL["tiny_fp32"])
    # Unchanged up to float rounding (attention is fused here, explicit in the full cache above).
    for name in (read, "blocks.0.hook_attn_out"):
        torch.testing.assert_close(patched[name], cache[name], **TOL["tiny_fp32"])
    torch.testing.assert_close(patched["blocks.0.hook_resid_post"],
                               patched[read] + (patched["blocks.0.hook_attn_out"] if parallel else 0)
                               + patched["blocks.0.hook_mlp_out"], **TOL["tiny_fp32"])
    model.set_use_hook_mlp_in(False)
    assert "blocks.0.hook_mlp_in" not in model.hook_dict
    torch.testing.assert_close(model(TOKENS), plain, **TOL["tiny_fp32"])
    with pytest.raises(ValueError, match="attention-only"):
        tl_model(tl, None, attn_only=True).set_use_hook_mlp_in(True)


def test_bad_flags_are_refused_before_anything_changes(tl):
    model = tl_model(tl, 2)
    # (under pytest the annotations are type-checked first; either way the message names the flag)
    with pytest.raises(TypeError, match="use_split_qkv_input"):
        model.set_use_split_qkv_input("yes")
    with pytest.raises(TypeError, match="ungroup_grouped_query_attention"):
        model.set_ungroup_grouped_query_attention(1)
    assert not any(block.use_split_qkv_input or block.attn.ungroup_grouped_query_attention for block in model.blocks)
    assert model.cfg.use_split_qkv_input is False
    torch.manual_seed(0)
    bloom_cfg = REGISTRY["BloomForCausalLM"].tiny_hf_configs()["residual_post_layernorm"]
    bloom = CoreModel.from_pretrained_no_processing(transformers.AutoModelForCausalLM.from_config(bloom_cfg))
    with pytest.raises(ValueError, match="no attention input to split"):  # its residual is ln1's output
        bloom.set_use_split_qkv_input(True)
    assert "blocks.0.hook_q_input" not in bloom.hook_dict
    with pytest.raises(ValueError, match="use_attn_in"):  # still not built
        tl.HookedTransformerConfig(n_layers=1, d_model=8, d_head=4, n_ctx=4, d_vocab=5, act_fn="relu",
                                   use_attn_in=True).to_model_config()
