"""Family-independent readers of HF config fields, each beside the set of fields it reads.

A reader accepts every layout of its fields that a supported transformers release writes (4.57's
``rope_theta`` + ``rope_scaling`` + ``partial_rotary_factor`` / ``rotary_pct``, 5.x's
``rope_parameters``) and returns one layout; where two names of one field are both present they must
agree, or the config is refused. A family that uses a reader adds its field set to its handled fields.
"""

from typing import Any

import transformers
from packaging.version import Version

from hooked_attn.architectures.base import UnsupportedConfigError
from hooked_attn.config import ActFn, RopeScaling, Rotary

TRANSFORMERS_MAJOR = Version(transformers.__version__).major
# transformers 5 moved rope_theta / rope_scaling / partial_rotary_factor into one rope_parameters dict.
ROPE_PARAMETERS_LAYOUT = TRANSFORMERS_MAJOR >= 5

# HF activation names -> ours, for the families that accept the usual six.
ACTIVATIONS: dict[str, ActFn] = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_new",
                                 "gelu_pytorch_tanh": "gelu_new", "relu": "relu"}

ROPE_FIELDS = frozenset({"rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor",
                         "rotary_pct", "rotary_emb_base"})
_ROPE_KEYS = {"rope_type", "rope_theta", "factor", "original_max_position_embeddings", "low_freq_factor",
              "high_freq_factor", "partial_rotary_factor"}


def renamed_field(hf: Any, arch: str, *names: str, default: Any = None) -> Any:
    """A field that transformers has spelled several ways (``rotary_pct`` / ``partial_rotary_factor``):
    the value under whichever names are set, which must agree, else ``default``."""
    found = {name: getattr(hf, name, None) for name in names}
    found = {name: value for name, value in found.items() if value is not None}
    if len(set(map(repr, found.values()))) > 1:
        raise UnsupportedConfigError(f"{arch}: config fields {found} name one setting with different values")
    return next(iter(found.values()), default)


def rope_parameters(hf: Any, arch: str, default_theta: float = 10_000.0) -> dict[str, Any]:
    """The rotary settings the installed transformers' model reads, in 5.x's ``rope_parameters`` layout.

    transformers 5 reads ``rope_parameters`` only (``PreTrainedConfig.convert_rope_params_to_dict``
    copies a top-level ``partial_rotary_factor`` into it with setdefault, so the dict's copy wins). transformers 4.57 reads ``rope_theta``
    (GPT-NeoX: ``rotary_emb_base``, copied into rope_theta), ``rope_scaling`` (``type`` is the legacy
    spelling of ``rope_type``) and ``partial_rotary_factor`` (GPT-NeoX: ``rotary_pct``, copied into it);
    a ``rope_parameters`` that 4.57 finds in a config written by transformers 5 is ignored by its model,
    so it is accepted only when it says the same.
    """
    params = getattr(hf, "rope_parameters", None)
    top_partial = renamed_field(hf, arch, "partial_rotary_factor", "rotary_pct")
    if ROPE_PARAMETERS_LAYOUT:
        return dict(params or {"rope_theta": default_theta})  # top_partial is already in it, or None
    rope = {"rope_type": "default", "rope_theta": renamed_field(hf, arch, "rope_theta", "rotary_emb_base",
                                                               default=default_theta)}
    scaling = dict(getattr(hf, "rope_scaling", None) or {})
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    rope.update(scaling)
    if top_partial is not None:
        rope["partial_rotary_factor"] = top_partial
    if params is not None and {**{"rope_type": "default"}, **dict(params)} != rope:
        raise UnsupportedConfigError(f"{arch}: config field rope_parameters={dict(params)!r} (a transformers 5 "
                                     f"field) disagrees with what transformers {transformers.__version__} reads: {rope!r}")
    return rope


def rotary_from_hf(rope: dict, d_head: int, arch: str) -> Rotary:
    """Our Rotary from HF ``rope_parameters`` (default, linear and llama3 types)."""
    unknown = set(rope) - _ROPE_KEYS
    kind = rope.get("rope_type", "default")
    if unknown or kind not in ("default", "linear", "llama3"):
        what = f"rope_type={kind!r}" if not unknown else f"keys {sorted(unknown)}"
        raise UnsupportedConfigError(f"{arch}: rope_parameters with {what} is not supported "
                                     "(supported rope types: default, linear, llama3)")
    scaling = None
    if kind == "linear":
        scaling = RopeScaling(kind="linear", factor=float(rope["factor"]))
    elif kind == "llama3":
        scaling = RopeScaling(kind="llama3", factor=float(rope["factor"]),
                              original_n_ctx=int(rope["original_max_position_embeddings"]),
                              low_freq_factor=float(rope["low_freq_factor"]),
                              high_freq_factor=float(rope["high_freq_factor"]))
    n_rot = int(d_head * rope.get("partial_rotary_factor", 1.0))
    return Rotary(n_rotary_dims=n_rot, base=float(rope["rope_theta"]), pairing="halves", scaling=scaling)


def full_head_rotary(rope: dict | None, d_head: int, arch: str) -> Rotary:
    """Rotary over all of ``d_head`` from HF ``rope_parameters``, for families whose rotary class
    rotates the whole head.

    Their ``compute_default_rope_parameters`` (e.g. ``MistralRotaryEmbedding``) builds frequencies
    for the full ``head_dim`` and ignores ``partial_rotary_factor``, while the scaled rope types of
    modeling_rope_utils.py honour it and then fail in ``apply_rotary_pos_emb``; a factor other than
    1 is therefore refused rather than guessed.
    """
    rope = dict(rope or {"rope_theta": 10_000.0})
    factor = rope.pop("partial_rotary_factor", 1.0)
    if factor != 1.0:
        raise UnsupportedConfigError(
            f"{arch}: rope_parameters partial_rotary_factor={factor!r} is not supported (this family's HF "
            "rotary embedding rotates the full head_dim for the default rope type)"
        )
    return rotary_from_hf(rope, d_head, arch)


def rope_config(rope_type: str = "default", rope_theta: float = 10_000.0, **scaling: Any) -> dict[str, Any]:
    """Config keyword arguments for a rotary setting, in the installed transformers' layout (for the
    families' ``tiny_hf_configs``): ``rope_parameters`` on 5.x, ``rope_theta`` + ``rope_scaling`` on 4.57."""
    if ROPE_PARAMETERS_LAYOUT:
        return {"rope_parameters": {"rope_type": rope_type, "rope_theta": rope_theta, **scaling}}
    partial = scaling.pop("partial_rotary_factor", None)
    kwargs: dict[str, Any] = {"rope_theta": rope_theta}
    if rope_type != "default" or scaling:
        # Both spellings of the type: 4.57's rope_config_validation wants rope_type (and accepts the
        # legacy type beside it); 4.57's OLMo validates only {"type", "factor"} (see olmo.py).
        kwargs["rope_scaling"] = {"rope_type": rope_type, "type": rope_type, **scaling}
    if partial is not None:
        kwargs["partial_rotary_factor"] = partial
    return kwargs


WINDOW_FIELDS = frozenset({"layer_types", "sliding_window"})


def windows_from_layer_types(
    layer_types: list[str] | None, sliding_window: int | None, n_layers: int, arch: str
) -> tuple[int | None, ...] | None:
    """Per-layer windows for ``ModelConfig.attn_windows`` from HF ``layer_types``.

    HF builds one mask per layer type (``causal_mask_mapping[config.layer_types[i]]``):
    ``create_sliding_window_causal_mask`` for "sliding_attention" layers, with
    ``config.sliding_window`` and the rule ``kv_idx > q_idx - sliding_window``
    (masking_utils.py ``sliding_window_overlay``), the same rule as our ``attn_windows``. Returns
    None when every layer is full attention.
    """
    types = list(layer_types or ["full_attention"] * n_layers)
    if len(types) != n_layers:
        raise UnsupportedConfigError(f"{arch}: config field layer_types has {len(types)} entries for {n_layers} layers")
    unknown = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if unknown:
        raise UnsupportedConfigError(f"{arch}: config field layer_types has unsupported layer types {unknown}")
    if "sliding_attention" not in types:
        return None
    if sliding_window is None or sliding_window <= 0:
        # HF's create_sliding_window_causal_mask raises for a missing window; we refuse the same config.
        raise UnsupportedConfigError(
            f"{arch}: config field layer_types has sliding_attention layers but sliding_window={sliding_window!r}"
        )
    return tuple(sliding_window if t == "sliding_attention" else None for t in types)


def activation(hf: Any, arch: str, field: str = "hidden_act", *, table: dict[str, ActFn] = ACTIVATIONS) -> ActFn:
    """Our name for the activation in ``hf.<field>`` (``hidden_act``, ``activation_function``...), or
    :class:`UnsupportedConfigError` naming the field, its value and the supported names."""
    value = getattr(hf, field)
    if value not in table:
        raise UnsupportedConfigError(f"{arch}: config field {field}={value!r} is not supported "
                                     f"(supported: {', '.join(sorted(table))})")
    return table[value]


def head_dim(hf: Any) -> int:
    """d_head as the LLaMA-style attention modules read it: ``getattr(config, "head_dim", None) or
    hidden_size // num_attention_heads`` (a config with no head_dim field, or None, splits evenly)."""
    return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads


def rotary_dims(rope: dict, d_head: int, arch: str, *, zero_ok: bool = True) -> int:
    """How many of each head's d_head dimensions rotate: ``int(d_head * partial_rotary_factor)`` (HF's
    ``rotary_ndims``), refused unless even and positive, or zero where ``zero_ok`` (no rotation at all;
    ``zero_ok=False`` for a family whose HF attention fails with no rotary dimensions)."""
    n_rot = int(d_head * rope.get("partial_rotary_factor", 1.0))
    if n_rot < (0 if zero_ok else 1) or n_rot % 2:
        needed = "zero or a positive even number is needed" if zero_ok else (
            "a positive even number is needed (HF's own attention fails with no rotary dimensions, so there "
            "is no model to match)")
        raise UnsupportedConfigError(
            f"{arch}: rope_parameters partial_rotary_factor={rope.get('partial_rotary_factor')!r} gives "
            f"{n_rot} rotary dimensions of d_head={d_head}; {needed}"
        )
    return n_rot
