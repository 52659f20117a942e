"""The record each architecture registers, the key ledger that accounts for every HF key, and the
config check that refuses HF fields a converter does not understand."""

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor
from transformers import PretrainedConfig

from hooked_attn.config import ModelConfig
from hooked_attn.shapes import StateDict


class UnsupportedConfigError(ValueError):
    """An HF config asks for something the converter does not implement."""


class UnknownArchitectureError(ValueError):
    """No converter is registered for this HF architecture."""


class StateDictError(KeyError):
    """An HF state dict lacks keys, has keys nobody consumed, or has tensors of the wrong shape."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


# Fields every HF config carries that do not change what the model computes at inference.
COMMON_IGNORED_HF_FIELDS = frozenset({
    "_name_or_path", "_model_name_or_path", "unk_token_id", "transformers_version", "architectures", "dtype", "torch_dtype", "id2label",
    "label2id", "problem_type", "output_hidden_states", "output_attentions", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "model_type", "tokenizer_class", "prefix",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "use_cache", "initializer_range", "_attn_implementation_autoset",
    "tf_legacy_loss", "use_bfloat16", "pruned_heads", "torchscript", "finetuning_task",
    "cross_attention_hidden_size", "tie_encoder_decoder",
})

# Fields that transformers derives from others in some releases and not in others (FalconConfig stores
# num_key_value_heads from 5.25 on, computed from multi_query / new_decoder_architecture / num_kv_heads).
# A converter that does not read such a field still computes the quantity from the fields it does read:
# the field is accepted when its value equals ours and refused, like any unknown field, when it differs.
DERIVED_HF_FIELDS: Mapping[str, Callable[[ModelConfig], Any]] = {
    "num_key_value_heads": lambda cfg: cfg.n_kv_heads,
    "head_dim": lambda cfg: cfg.d_head,
}


Kind = Literal["decoder", "encoder"]


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """One HF family: how its config maps to ours and its weights to our layout.

    ``handled_hf_fields`` are read by ``config_from_hf``; ``ignored_hf_fields`` cannot change the
    result (dropouts, training-only settings). Any other field that differs from the HF default is
    refused.
    """

    hf_architecture: str
    model_type: str
    handled_hf_fields: frozenset[str]
    ignored_hf_fields: frozenset[str]
    config_from_hf: Callable[[Any], ModelConfig]
    convert_state_dict: Callable[[StateDict, ModelConfig, Any], dict[str, Tensor]]
    tiny_hf_configs: Callable[[], dict[str, PretrainedConfig]] = field(repr=False)
    kind: Kind = "decoder"  # the model class that loads it: HookedTransformer, HookedEncoder


def check_hf_config(hf: PretrainedConfig, arch: Architecture) -> None:
    """Refuse any field that is neither handled nor ignored and differs from its HF default, unless it
    is one of ``DERIVED_HF_FIELDS`` and equals what ``arch.config_from_hf`` computes for it.

    Raises:
        UnsupportedConfigError: naming the first such field, its value and the default.
    """
    values = hf.to_dict()
    defaults = type(hf)().to_dict()
    known = arch.handled_hf_fields | arch.ignored_hf_fields | COMMON_IGNORED_HF_FIELDS
    ours: list[ModelConfig] = []  # converted once, only when a derived field needs checking
    for name, value in values.items():
        if name in known:
            continue
        if name == "quantization_config" and isinstance(value, Mapping) and value.get("quant_method") == "gguf":
            continue  # transformers dequantises GGUF weights to plain tensors on load
        if value != defaults.get(name) and name in DERIVED_HF_FIELDS:
            ours = ours or [arch.config_from_hf(hf)]  # refuses, itself, what the converter cannot read
            if DERIVED_HF_FIELDS[name](ours[0]) == value:
                continue
        if value != defaults.get(name):  # a field HF does not know counts as None by default
            raise UnsupportedConfigError(
                f"{arch.hf_architecture}: config field {name}={value!r} (default {defaults.get(name)!r}) is not "
                "supported by hooked_attn's converter, and converting anyway could give a silently wrong model"
            )
    width, heads = getattr(hf, "hidden_size", None), getattr(hf, "num_attention_heads", None)
    if isinstance(width, int) and isinstance(heads, int) and getattr(hf, "head_dim", None) is None:
        if heads <= 0 or width % heads:
            raise UnsupportedConfigError(
                f"{arch.hf_architecture}: hidden size {width} is not divisible by the {heads} attention heads "
                "(and the config gives no head_dim), so the heads cannot split it")


class KeyLedger:
    """Wraps an HF state dict: ``pop`` records each key used; ``finish`` refuses keys left over."""

    def __init__(self, state_dict: StateDict, source: str) -> None:
        self._sd = state_dict
        self._unused = dict.fromkeys(state_dict)
        self.source = source

    def __contains__(self, key: str) -> bool:
        return key in self._sd

    def pop(self, key: str, shape: Iterable[int] | None = None) -> Tensor:
        """The tensor at ``key``, checked against ``shape`` when given."""
        if key not in self._sd:
            raise StateDictError(f"{self.source}: the state dict has no {key!r} (it has {len(self._sd)} keys)")
        tensor = self._sd[key]
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise StateDictError(
                f"{self.source}: {key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)} from the config"
            )
        self._unused.pop(key, None)
        return tensor

    def pop_optional(self, key: str, shape: Iterable[int] | None = None) -> Tensor | None:
        return self.pop(key, shape) if key in self._sd else None

    def finish(self, ignore: Iterable[str] = ()) -> None:
        """Raise if any key was neither consumed nor matched by an ``ignore`` glob."""
        patterns = tuple(ignore)
        left = [k for k in self._unused if not any(fnmatch.fnmatchcase(k, p) for p in patterns)]
        if left:
            shown = ", ".join(left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else "")
            raise StateDictError(f"{self.source}: {len(left)} unexpected keys the converter does not use: {shown}")
