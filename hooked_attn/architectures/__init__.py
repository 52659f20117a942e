"""The architecture registry: one module per HF family, each registering one Architecture record on import."""

from transformers import PretrainedConfig

from hooked_attn.architectures.base import Architecture, UnknownArchitectureError

REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    if arch.hf_architecture in REGISTRY:
        raise ValueError(f"architecture {arch.hf_architecture} is registered twice")
    REGISTRY[arch.hf_architecture] = arch
    return arch


def get_architecture(hf_architecture: str | None, hf_config: PretrainedConfig | None = None) -> Architecture:
    """The registered family for an HF class name (or, failing that, the config's model_type).

    Raises:
        UnknownArchitectureError: listing the supported architectures.
    """
    if hf_architecture in REGISTRY:
        return REGISTRY[hf_architecture]
    model_type = getattr(hf_config, "model_type", None)
    if hf_architecture is None:
        by_type = [a for a in REGISTRY.values() if a.model_type == model_type]
        if by_type:
            return by_type[0]
    raise UnknownArchitectureError(
        f"architecture {hf_architecture!r} (model_type {model_type!r}) is not supported; supported: "
        f"{', '.join(sorted(REGISTRY))}"
    )


def _import_families() -> None:
    """Import every family module in this package; each registers itself. Adding a family is
    adding one file: there is no list to edit."""
    import importlib
    import pkgutil

    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module.name not in ("base", "common"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_families()
