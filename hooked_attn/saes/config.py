"""SAEConfig: the typed, frozen description of a sparse autoencoder or transcoder, read from and
written to SAELens' ``cfg.json`` (format 6.x)."""

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Architecture = Literal["standard", "gated", "jumprelu", "topk", "transcoder", "skip_transcoder", "jumprelu_transcoder"]
ARCHITECTURES: tuple[str, ...] = Architecture.__args__  # type: ignore[attr-defined]
TRANSCODERS = frozenset({"transcoder", "skip_transcoder", "jumprelu_transcoder"})
# "expected_average_only_in" is a training-time input scale that SAELens folds into the weights
# before saving; at inference it is the identity, in SAELens as here.
Normalization = Literal["none", "expected_average_only_in", "layer_norm", "constant_norm_rescale"]
NORMALIZATIONS: tuple[str, ...] = Normalization.__args__  # type: ignore[attr-defined]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_COMMON_FIELDS = frozenset({"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                            "normalize_activations", "reshape_activations", "metadata"})
_ARCH_FIELDS: dict[str, frozenset[str]] = {
    "topk": frozenset({"k", "rescale_acts_by_decoder_norm"}),
    "transcoder": frozenset({"d_out"}),
    "skip_transcoder": frozenset({"d_out"}),
    "jumprelu_transcoder": frozenset({"d_out"}),
}
# Metadata keys that change what the SAE computes or where it splices; the rest is provenance
# (model_name, context_size, dataset_path, ...) and is kept and written back as it came.
_METADATA_READ = ("hook_name", "hook_head_index", "hook_name_out", "hook_head_index_out")


class SAEConfigError(ValueError):
    """A cfg.json this library cannot honour: an unknown field or value, named in the message."""


def dtype_from_str(name: str) -> torch.dtype:
    key = name.removeprefix("torch.")
    if key not in _DTYPES:
        raise SAEConfigError(f"dtype {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def dtype_to_str(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise SAEConfigError(f"dtype {dtype} is not one of {sorted(_DTYPES)}")


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """What an SAE computes and where it splices.

    ``hook_name`` is where its input is read (and, for an SAE, where its output is written back);
    a transcoder writes to ``hook_name_out``. ``hook_head_index`` picks one head of a
    ``[batch pos head d_head]`` activation. ``metadata`` keeps the other SAELens metadata keys.
    """

    architecture: Architecture
    d_in: int
    d_sae: int
    hook_name: str | None = None
    hook_head_index: int | None = None
    d_out: int | None = None                       # transcoders only
    hook_name_out: str | None = None               # transcoders only
    hook_head_index_out: int | None = None
    k: int | None = None                           # topk only
    rescale_acts_by_decoder_norm: bool = False     # topk only
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    normalize_activations: Normalization = "none"
    reshape_activations: Literal["none", "hook_z"] = "none"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SAEConfigError(f"architecture {self.architecture!r} is not supported; supported: {list(ARCHITECTURES)}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise SAEConfigError(f"normalize_activations={self.normalize_activations!r} is not supported; "
                                 f"supported: {list(NORMALIZATIONS)}")
        if self.reshape_activations not in ("none", "hook_z"):
            raise SAEConfigError(f"reshape_activations={self.reshape_activations!r}: expected 'none' or 'hook_z'")
        dtype_from_str(self.dtype)
        if self.d_in <= 0 or self.d_sae <= 0:
            raise SAEConfigError(f"d_in={self.d_in} and d_sae={self.d_sae} must be positive")
        is_transcoder = self.architecture in TRANSCODERS
        if is_transcoder and self.d_out is None:
            raise SAEConfigError(f"a {self.architecture} needs d_out")
        if not is_transcoder and (self.d_out is not None or self.hook_name_out is not None):
            raise SAEConfigError(f"d_out / hook_name_out are for transcoders, not a {self.architecture} SAE")
        if is_transcoder and self.apply_b_dec_to_input:
            raise SAEConfigError("apply_b_dec_to_input=True is not possible for a transcoder (b_dec has d_out entries)")
        if (self.architecture == "topk") != (self.k is not None):
            raise SAEConfigError(f"k is set exactly for topk SAEs; got architecture={self.architecture!r}, k={self.k}")
        if self.k is not None and not 0 < self.k <= self.d_sae:
            raise SAEConfigError(f"k={self.k} must be in 1..d_sae={self.d_sae}")
        if self.rescale_acts_by_decoder_norm and self.architecture != "topk":
            raise SAEConfigError("rescale_acts_by_decoder_norm is a topk option")
        if self.reshape_activations == "hook_z" and self.hook_name is not None and not self.hook_name.endswith("hook_z"):
            raise SAEConfigError(f"reshape_activations='hook_z' but hook_name={self.hook_name!r} is not a hook_z")

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_str(self.dtype)

    @property
    def is_transcoder(self) -> bool:
        return self.architecture in TRANSCODERS

    @property
    def d_output(self) -> int:
        return self.d_out if self.d_out is not None else self.d_in

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "SAEConfig":
        """Read a SAELens 6.x ``cfg.json`` dict; any field this library does not implement is refused by name."""
        if "architecture" not in raw:
            raise SAEConfigError("cfg.json has no 'architecture' field (SAELens < 6 configs are not read)")
        arch = raw["architecture"]
        if arch not in ARCHITECTURES:
            raise SAEConfigError(f"architecture {arch!r} is not supported; supported: {list(ARCHITECTURES)}")
        unknown = sorted(set(raw) - _COMMON_FIELDS - _ARCH_FIELDS.get(arch, frozenset()))
        if unknown:
            raise SAEConfigError(f"cfg.json fields not implemented for a {arch} SAE: "
                                 + ", ".join(f"{k}={raw[k]!r}" for k in unknown))
        for key, allowed in (("normalize_activations", NORMALIZATIONS), ("reshape_activations", ("none", "hook_z"))):
            if raw.get(key, "none") not in allowed:
                raise SAEConfigError(f"{key}={raw[key]!r} is not supported; supported: {list(allowed)}")
        metadata = dict(raw.get("metadata") or {})
        read = {key: metadata.pop(key, None) for key in _METADATA_READ}
        fields = {k: v for k, v in raw.items() if k not in ("metadata", "architecture")}
        return cls(architecture=arch, **fields, **read, metadata=metadata)

    def to_dict(self) -> dict[str, Any]:
        """The SAELens 6.x ``cfg.json`` dict."""
        out: dict[str, Any] = {
            "d_in": self.d_in, "d_sae": self.d_sae, "dtype": self.dtype, "device": self.device,
            "apply_b_dec_to_input": self.apply_b_dec_to_input, "normalize_activations": self.normalize_activations,
            "reshape_activations": self.reshape_activations,
        }
        if self.architecture == "topk":
            out |= {"k": self.k, "rescale_acts_by_decoder_norm": self.rescale_acts_by_decoder_norm}
        if self.is_transcoder:
            out["d_out"] = self.d_out
        metadata = dict(self.metadata)
        # SAELens reads a config without this key as a pre-6.0 (flat) one; 6.0.0 names the format we write.
        metadata.setdefault("sae_lens_version", "6.0.0")
        for key in _METADATA_READ:
            value = getattr(self, key)
            if value is not None or key in ("hook_name", "hook_head_index"):
                metadata[key] = value
        out["metadata"] = metadata
        out["architecture"] = self.architecture
        return out
