"""Property-based equivalence: random small configs of every registered architecture equal HF.

For each family in the registry, Hypothesis starts from one of its ``tiny_hf_configs()`` variants
and redraws the fields that the family's converter handles (``handled_hf_fields``): depth, widths,
query and K/V heads, head width, rotary fraction and base, biases, norm placement flags and eps,
tied embeddings, window sizes, soft-caps, scales, experts and vocabulary. It then draws a dtype
(fp32 or fp64), a batch, a sequence length and a padding. Checked for each example:

- unprocessed logits equal HF's (fused attention, or the explicit path when a pattern is hooked);
- each padded row equals HF run on that row alone, at its real positions;
- processed log-probs equal HF's; processing shifts logits by a per-position constant only, and
  leaves the structure each step promises (zero-mean unembedding, zero value biases, ...).

A converter may refuse a config (``UnsupportedConfigError``) if the message names the field;
refusals are counted, and ``test_refusals_are_a_minority`` checks they stay rare.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (default) runs a few examples per family; ``long`` runs
many. Failing examples are stored in ``.hypothesis/`` and replayed first on the next run.
"""

import collections
import functools
import os
import re
from typing import Any

import pytest
import torch
import transformers
from conftest import TOL, randomize_, reference_attn_implementation
from hypothesis import HealthCheck, event, given, note, reject, settings
from hypothesis import strategies as st

from hooked_attn import HookedTransformer, ProcessingError, UnsupportedConfigError
from hooked_attn import processing as P
from hooked_attn.architectures import REGISTRY
from hooked_attn.architectures.base import DERIVED_HF_FIELDS

settings.register_profile(
    "ci", max_examples=25, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long", max_examples=500, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The reference is HF run in float64. Its rounding is not float64's: HF computes parts of a float64
# model in float32 (LlamaRMSNorm and its copies cast to float32, as do the rotary cos/sin tables, GPT-Neo's
# attention, BLOOM's ALiBi slopes, ...). And drawn configs can have large logits (no attention scaling,
# tiny eps, big multipliers), where float32 rounding alone exceeds TOL["tiny_fp32"]. So a model may be
# as far from the reference as HF's own float32 run is, times this margin (processing adds rounding of
# its own), and never less than TOL["tiny_fp32"]: the rule of test_real_weights.py and of the bf16
# test in test_equivalence.py. A real mismatch (a wrong eps, scale, bias or position) shows at 1e-3.
FP32_MARGIN = 8.0

# HF field names by concept (a family uses one of each). Only fields in the family's
# handled_hf_fields are redrawn: the others are refused by its converter if they change.
LAYERS = ("num_hidden_layers", "n_layer", "num_layers")
PER_LAYER_LISTS = ("layer_types", "no_rope_layers", "attention_layers")
WIDTHS = ("hidden_size", "n_embd")
HEADS = ("num_attention_heads", "n_head", "num_heads")
KV_HEADS = ("num_key_value_heads", "num_kv_heads")
MLP_WIDTHS = ("intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim")
EPS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")
BIASES = ("attention_bias", "use_qkv_bias", "bias", "use_bias", "enable_bias")
RARE_FLIPS = ("mlp_bias",)  # refused by some converters: flipped rarely so refusals stay a minority
FLAGS = (  # structural switches, flipped with probability 1/4
    "use_parallel_residual", "parallel_attn", "qk_layernorm", "use_qk_norm", "do_layer_norm_before",
    "new_decoder_architecture", "multi_query", "alibi", "scale_attn_by_inverse_layer_idx", "scale_attn_weights",
    "apply_residual_connection_post_layernorm", "layer_norm_elementwise_affine", "_remove_final_layer_norm",
)
WINDOWS = ("sliding_window", "window_size")
SOFT_CAPS = ("attn_logit_softcapping", "final_logit_softcapping")
SCALES = ("logit_scale", "logits_scaling", "embedding_multiplier", "residual_multiplier", "attention_multiplier",
          "query_pre_attn_scalar")

STATS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@functools.cache
def _variants(arch_name: str) -> dict[str, tuple[type, dict[str, Any]]]:
    """Each tiny variant's config class and fields (building HF configs is slow: done once)."""
    return {name: (type(cfg), cfg.to_dict()) for name, cfg in REGISTRY[arch_name].tiny_hf_configs().items()}


def _resize(values: list, n: int) -> list:
    """A per-layer list repeated or cut to ``n`` layers, keeping its pattern."""
    return [values[i % len(values)] for i in range(n)]


def _redraw_rope(draw: st.DrawFn, rope: dict[str, Any]) -> dict[str, Any]:
    """New base and rotary fraction in a rope_parameters dict (nested per layer type for Gemma 3)."""
    out = {}
    for key, value in rope.items():
        if isinstance(value, dict):
            out[key] = _redraw_rope(draw, value)
        elif key == "rope_theta":
            out[key] = draw(st.sampled_from([10.0, 500.0, 10_000.0, 1e6]))
        elif key == "partial_rotary_factor":
            out[key] = draw(st.sampled_from([0.25, 0.5, 1.0]))
        else:
            out[key] = value
    return out


@st.composite
def hf_configs(draw: st.DrawFn, arch_name: str) -> tuple[str, transformers.PretrainedConfig]:
    """(variant, HF config): a family's tiny variant with every handled field it has redrawn."""
    arch = REGISTRY[arch_name]
    variant = draw(st.sampled_from(sorted(_variants(arch_name))))
    config_class, base = _variants(arch_name)[variant]
    d = dict(base)

    def has(field: str) -> bool:
        return field in d and field in arch.handled_hf_fields

    flip = st.integers(0, 3).map(lambda i: i == 0)
    for field in LAYERS:
        if has(field):
            n_layers = draw(st.integers(1, 3))
            d[field] = n_layers
            for per_layer in PER_LAYER_LISTS:
                if isinstance(d.get(per_layer), list):
                    d[per_layer] = _resize(d[per_layer], n_layers)
            if "attention_types" in d:  # GPT-Neo: [[pattern, repeats]] must spell attention_layers
                d["attention_types"] = [[d["attention_layers"], 1]]
    has_kv = any(has(f) for f in KV_HEADS)
    n_kv = draw(st.integers(1, 3))
    n_heads = n_kv * draw(st.integers(1, 3)) if has_kv else draw(st.integers(1, 6))
    d_head = draw(st.sampled_from([8, 16, 24]))  # multiples of 8: every rotary fraction gives even dims
    free_head_dim = has("head_dim") and d["head_dim"] is not None
    old_width = next(d[f] for f in WIDTHS if f in d)
    # HF validates hidden_size % num_heads == 0 even where head_dim is free (LlamaConfig and others).
    width = n_heads * (draw(st.sampled_from([d_head, 4, 8, 12])) if free_head_dim else d_head)
    for field in WIDTHS:
        if has(field):
            d[field] = width
    for field in HEADS:
        if has(field):
            d[field] = n_heads
    for field in KV_HEADS:
        if has(field):
            d[field] = n_kv
    if free_head_dim:
        d["head_dim"] = d_head
    if has("rotary_dim"):  # GPT-J: the first rotary_dim dims of each head rotate
        d["rotary_dim"] = draw(st.sampled_from([2, d_head // 2, d_head]))
    if has("word_embed_proj_dim"):  # OPT: project embeddings from/to this width
        d["word_embed_proj_dim"] = width if d["word_embed_proj_dim"] == old_width else draw(st.sampled_from([8, 16]))
    for field in MLP_WIDTHS:
        if has(field):
            widths = st.sampled_from([8, 16, 40, 64])
            d[field] = draw(st.none() | widths if d[field] is None else widths)
    if has("vocab_size"):
        d["vocab_size"] = draw(st.integers(40, 130))
    for field in EPS:
        if has(field):
            d[field] = draw(st.sampled_from([1e-6, 1e-5, 1e-2, 0.5]))
    for field in ("tie_word_embeddings", *BIASES):
        if has(field):
            d[field] = draw(st.booleans())
    for field in FLAGS:
        if has(field) and draw(flip):
            d[field] = not d[field]
    for field in RARE_FLIPS:
        if has(field) and draw(st.integers(0, 9)) == 0:
            d[field] = not d[field]
    for field in WINDOWS:
        if has(field) and d[field] is not None:
            d[field] = draw(st.integers(1, 8))
    for field in SOFT_CAPS:
        if has(field):
            d[field] = draw(st.sampled_from([None, 1.0, 5.0, 30.0]))
    for field in SCALES:
        if has(field) and d[field] is not None:
            d[field] = type(d[field])(d[field] * draw(st.sampled_from([0.5, 1, 2])))
    if has("rope_parameters") and isinstance(d["rope_parameters"], dict):
        d["rope_parameters"] = _redraw_rope(draw, d["rope_parameters"])
        fraction = d["rope_parameters"].get("partial_rotary_factor")
        if has("partial_rotary_factor") and fraction is not None:  # Phi-3 keeps a top-level copy
            d["partial_rotary_factor"] = fraction
    if has("num_local_experts"):
        d["num_local_experts"] = draw(st.integers(2, 4))
        d["num_experts_per_tok"] = draw(st.integers(1, min(3, d["num_local_experts"])))
    if has("clip_qkv"):
        d["clip_qkv"] = draw(st.sampled_from([None, 0.5, 3.0]))
    # Fields HF reads only in some layouts: keep them consistent so the converter's refusals of
    # contradictory configs stay rare (Falcon: FalconConfig / FalconAttention).
    if d.get("new_decoder_architecture") is False and d.get("multi_query") is False and has("num_kv_heads"):
        d["num_kv_heads"] = n_heads  # the classic MHA layout has one K/V head per query head
    if d.get("new_decoder_architecture") and has("parallel_attn"):
        d["parallel_attn"] = True  # the new layout is always parallel
    for field in DERIVED_HF_FIELDS.keys() - arch.handled_hf_fields:
        # The base dict holds the value HF derived for the tiny variant's own fields (FalconConfig's
        # num_key_value_heads, from 5.25 on); once those fields are redrawn it is stale, which a config HF
        # builds never is. Dropped, HF derives it afresh (tests/test_hf_fields.py refuses a stale one).
        d.pop(field, None)
    note(f"{arch_name} variant {variant!r} with {({k: v for k, v in d.items() if base.get(k) != v})}")
    try:
        return variant, config_class.from_dict(d)
    except ValueError as err:  # HF's own validation refuses the combination (rare by construction)
        STATS[arch_name]["hf_invalid"] += 1
        event(f"HF refuses the config: {type(err).__name__}")
        reject()


def _hf_model(hf_cfg: transformers.PretrainedConfig, seed: int) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    # HF's default grouped_mm experts kernel refuses float64; its eager loop is the reference anyway.
    moe = {"experts_implementation": "eager"} if "num_local_experts" in hf_cfg.to_dict() else {}
    hf = transformers.AutoModelForCausalLM.from_config(
        hf_cfg, attn_implementation=reference_attn_implementation(hf_cfg), **moe).eval()
    return randomize_(hf, seed)


def _tolerances(hf: transformers.PreTrainedModel, tokens: torch.Tensor, moe: bool) -> tuple[dict, dict]:
    """Tolerances against the float64 reference, for logits and for log-probs (see FP32_MARGIN).

    Takes ``hf`` in float32 and leaves it in float64 (exact: the weights were drawn in float32).
    """
    ref32 = hf(tokens).logits.double()
    ref64 = hf.to(torch.float64)(tokens).logits
    if moe:  # a float32 run may route differently, which says nothing about rounding
        return TOL["tiny_fp32"], TOL["tiny_fp32"]
    tols = []
    for ours, truth in ((ref32, ref64), (ref32.log_softmax(-1), ref64.log_softmax(-1))):
        atol = max(TOL["tiny_fp32"]["atol"], FP32_MARGIN * (ours - truth).abs().max().item())
        tols.append({"atol": atol, "rtol": TOL["tiny_fp32"]["rtol"]})
    if tols[0]["atol"] > TOL["tiny_fp32"]["atol"]:
        event("tolerance raised to HF's own fp32 error")
    return tols[0], tols[1]


def _names_a_field(message: str, hf_cfg: transformers.PretrainedConfig) -> bool:
    return any(re.search(rf"\b{re.escape(field)}\b", message) for field in hf_cfg.to_dict())


def _check_processing_structure(model: HookedTransformer, unprocessed: HookedTransformer) -> None:
    """What each applied step leaves behind (see hooked_attn/processing.py)."""
    cfg, sd = model.cfg, model.state_dict()
    done = cfg.processing
    for step in ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"):
        assert getattr(done, step) == (P.why_not(step, unprocessed.cfg) is None), step
    zero = {"atol": 1e-5 if model.dtype == torch.float32 else 1e-12, "rtol": 0}
    if done.fold_ln:
        assert not cfg.norm.weight and not cfg.norm.bias
    if done.center_unembed:
        torch.testing.assert_close(sd["unembed.W_U"].mean(-1), torch.zeros_like(sd["unembed.W_U"][:, 0]), **zero)
        torch.testing.assert_close(sd["unembed.b_U"].mean(), torch.zeros_like(sd["unembed.b_U"][0]), **zero)
    if done.fold_value_biases:
        assert all(torch.all(sd[f"blocks.{i}.attn.b_V"] == 0) for i in range(cfg.n_layers))
    if done.center_writing_weights:
        for key in ["embed.W_E"] + [f"blocks.{i}.attn.W_O" for i in range(cfg.n_layers)]:
            torch.testing.assert_close(sd[key].mean(-1), torch.zeros_like(sd[key][..., 0]), **zero)


def _padded(tokens: torch.Tensor, pads: list[int], side: str, filler: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``tokens`` with ``pads[row]`` positions replaced by padding on ``side``, and the mask."""
    n_pos = tokens.shape[1]
    mask = torch.ones_like(tokens)
    padded = tokens.clone()
    for row, n_pad in enumerate(pads):
        pad_slice = slice(0, n_pad) if side == "left" else slice(n_pos - n_pad, n_pos)
        mask[row, pad_slice] = 0
        padded[row, pad_slice] = filler[row, pad_slice]
    return padded, mask


@pytest.mark.parametrize("arch_name", sorted(name for name, a in REGISTRY.items() if a.kind == "decoder"))
@settings(PROFILE)
@given(data=st.data())
def test_random_configs_match_hf(arch_name: str, data: st.DataObject) -> None:
    stats = STATS[arch_name]
    variant, hf_cfg = data.draw(hf_configs(arch_name), label="config")
    moe = "num_local_experts" in hf_cfg.to_dict()
    # MoE routing is a discrete top-k: in fp32 a near-tie can flip under rounding alone. In fp64 it
    # cannot in practice; test_equivalence.py and test_moe.py cover fp32 MoE on fixed seeds.
    dtype = torch.float64 if moe else data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    stats["attempted"] += 1
    hf = _hf_model(hf_cfg, seed)
    try:
        model = HookedTransformer.from_pretrained_no_processing(hf, dtype=dtype)
    except UnsupportedConfigError as err:
        assert _names_a_field(str(err), hf_cfg), f"the refusal does not name a config field: {err}"
        stats["refused"] += 1
        event(f"refused: {str(err).split(':')[1].strip()[:60]}")
        reject()
    stats["converted"] += 1

    batch = data.draw(st.integers(1, 3), label="batch")
    n_pos = data.draw(st.integers(1, 10), label="n_pos")
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, hf_cfg.vocab_size, (batch, n_pos), generator=gen)
    with torch.no_grad():
        tol, tol_log_probs = _tolerances(hf, tokens, moe)
        tol, tol_log_probs = (dict(t, check_dtype=False) for t in (tol, tol_log_probs))
        ref = hf(tokens).logits  # float64 from here on
        if data.draw(st.booleans(), label="explicit attention path"):
            logits = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda x, hook: None)])
        else:
            logits = model(tokens)
        torch.testing.assert_close(logits, ref, **tol)

        side = data.draw(st.sampled_from(["left", "right"]), label="padding side")
        pads = [data.draw(st.integers(0, n_pos - 1), label="pad") for _ in range(batch)]
        padded, mask = _padded(tokens, pads, side, torch.randint(0, hf_cfg.vocab_size, tokens.shape, generator=gen))
        padded_logits = model(padded, attention_mask=mask)
        for row in range(batch):
            real = mask[row].bool()
            alone = hf(tokens[row : row + 1, real]).logits[0]
            torch.testing.assert_close(padded_logits[row, real], alone, **tol)

        refactor = data.draw(st.booleans(), label="refactor_factored_attn_matrices")
        reason = P.why_not("refactor_factored_attn_matrices", model.cfg)
        if refactor and reason is not None:
            with pytest.raises(ProcessingError, match="refactor_factored_attn_matrices"):
                HookedTransformer.from_pretrained(hf, dtype=dtype, refactor_factored_attn_matrices=True)
            refactor = False
        # Built from the float64 HF weights cast to dtype: the same weights as `model`.
        processed = HookedTransformer.from_pretrained(hf, dtype=dtype, refactor_factored_attn_matrices=refactor)
        processed_logits = processed(tokens)
        torch.testing.assert_close(processed_logits.log_softmax(-1), ref.log_softmax(-1), **tol_log_probs)
        shift = processed_logits - logits  # center_unembed: a constant per position; the rest: none
        torch.testing.assert_close(shift, shift[..., :1].expand_as(shift), **tol)
        if not processed.cfg.processing.center_unembed:
            torch.testing.assert_close(processed_logits, logits, **tol)
        assert processed.dtype == model.dtype == dtype
        _check_processing_structure(processed, model)
    event(f"dtype {dtype}, variant {variant}")


def test_refusals_are_a_minority() -> None:
    """Refused or HF-invalid configs must not hide most examples (needs the property tests above)."""
    if not STATS:
        pytest.skip("run together with test_random_configs_match_hf: it counts the refusals")
    for arch_name, stats in STATS.items():
        drawn = stats["attempted"] + stats["hf_invalid"]
        assert stats["converted"] >= (stats["refused"] + stats["hf_invalid"]), (arch_name, dict(stats))
        assert drawn > 0, arch_name
