"""``transformer_lens.model_bridge``: only ``TransformerBridge.boot_native``, which builds a small random model.

TransformerLens 3.x's ``TransformerBridge`` wraps live HF modules; hooked_attn does not rebuild it (its
own ``HookedTransformer.from_pretrained`` rebuilds HF models). ``boot_native`` needs no HF model and no
hub: it builds TransformerLens' native architecture from a config, which is what a ``HookedTransformer``
built from the same config is. So here it returns that ``HookedTransformer`` (hooked_attn's hook names,
TransformerLens' HookedTransformer names; no bridge aliases). Every other bridge entry point raises.
"""

import copy
from typing import Any

import torch

from hooked_attn.compat.errors import CompatError
from hooked_attn.compat.transformer_lens.config.transformer_bridge_config import TransformerBridgeConfig
from hooked_attn.compat.transformer_lens.HookedTransformer import HookedTransformer

_NOT_REBUILT = ("hooked_attn does not rebuild TransformerLens' TransformerBridge; TransformerBridge.boot_native(cfg) "
                "builds a HookedTransformer from a config, and HookedTransformer.from_pretrained loads HF models")


class TransformerBridge:
    """A namespace for ``boot_native``; constructing it, or any other bridge entry point, raises CompatError."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise CompatError(_NOT_REBUILT)

    @classmethod
    def boot_transformers(cls, *args: Any, **kwargs: Any) -> Any:
        raise CompatError(_NOT_REBUILT)

    @classmethod
    def boot_native(cls, config: Any, tokenizer: Any = None,  # Any: the check below names a wrong type
                    device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                    model_name: str = "native") -> HookedTransformer:
        """A randomly initialised model of TransformerLens' native architecture (``init_mode`` and ``seed``
        as the config says), as a ``HookedTransformer``. The caller's config is not changed; with a
        ``seed`` the caller's random state is not either.

        Raises:
            TypeError: ``config`` is neither a TransformerBridgeConfig nor a dict of its fields.
            ValueError: ``config.architecture`` names another architecture, or positions other than
                ``standard`` / ``rotary`` (what TransformerLens' native model builds) are asked for.
        """
        if not isinstance(config, (TransformerBridgeConfig, dict)):
            raise TypeError(f"boot_native expects a TransformerBridgeConfig or a dict of its fields, got "
                            f"{type(config).__name__}")
        cfg = TransformerBridgeConfig(**config) if isinstance(config, dict) else copy.deepcopy(config)
        if cfg.architecture not in (None, "TransformerLensNative"):
            raise ValueError(f"boot_native builds TransformerLens' native architecture only, not {cfg.architecture!r}: "
                             "leave config.architecture unset (or 'TransformerLensNative')")
        if cfg.positional_embedding_type not in ("standard", "rotary"):
            raise ValueError(f"boot_native builds 'standard' or 'rotary' positions, not "
                             f"{cfg.positional_embedding_type!r}; use HookedTransformer(cfg) for other kinds")
        cfg.model_name = model_name if cfg.model_name == "custom" else cfg.model_name
        if dtype is not None:
            cfg.dtype = dtype
        if device is not None:
            cfg.device = str(device)
        with torch.random.fork_rng(devices=[], enabled=cfg.seed is not None):
            return HookedTransformer(cfg.to_hooked_transformer_config(), tokenizer=tokenizer)


__all__ = ["TransformerBridge"]
