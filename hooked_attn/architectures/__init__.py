"""The architecture registry: one module per HF family, each registering one Architecture record on import.

Decoders (``kind="decoder"``, loaded by ``HookedTransformer``) and encoders (``kind="encoder"``, BERT,
loaded by ``HookedEncoder``) share the one ``REGISTRY``."""

from transformers import PretrainedConfig

from hooked_attn.architectures.base import Architecture, Kind, UnknownArchitectureError

REGISTRY: dict[str, Architecture] = {}
LOADERS = {"decoder": "HookedTransformer", "encoder": "HookedEncoder"}


def register(arch: Architecture) -> Architecture:
    if arch.hf_architecture in REGISTRY:
        raise ValueError(f"architecture {arch.hf_architecture} is registered twice")
    REGISTRY[arch.hf_architecture] = arch
    return arch


def by_kind(kind: Kind) -> dict[str, Architecture]:
    """The registered architectures of one kind ("decoder" or "encoder"), by HF class name."""
    return {name: arch for name, arch in REGISTRY.items() if arch.kind == kind}


def get_architecture(
    hf_architecture: str | None, hf_config: PretrainedConfig | None = None, kind: Kind = "decoder"
) -> Architecture:
    """The registered family of ``kind`` for an HF class name (or, failing that, the config's model_type).

    Raises:
        UnknownArchitectureError: listing the supported architectures of that kind (and naming the
            model class to use when the architecture is registered as the other kind).
    """
    registered = by_kind(kind)
    if hf_architecture in registered:
        return registered[hf_architecture]
    model_type = getattr(hf_config, "model_type", None)
    if hf_architecture is None:
        by_type = [a for a in registered.values() if a.model_type == model_type]
        if by_type:
            return by_type[0]
    other = REGISTRY.get(hf_architecture or "")
    article = "an" if other and other.kind == "encoder" else "a"
    hint = f" ({hf_architecture} is {article} {other.kind}: load it with {LOADERS[other.kind]})" if other else ""
    raise UnknownArchitectureError(
        f"architecture {hf_architecture!r} (model_type {model_type!r}) is not supported"
        f"{' as an encoder' if kind == 'encoder' else ''}{hint}; supported: {', '.join(sorted(registered))}"
    )


def _import_families() -> None:
    """Import every family module in this package; each registers itself. Adding a family is
    adding one file: there is no list to edit."""
    import importlib
    import pkgutil

    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module.name not in ("base", "common", "parsers"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_families()
