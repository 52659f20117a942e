"""``transformer_lens.config.transformer_bridge_config``: the config ``TransformerBridge.boot_native`` reads.

TransformerLens 3.x's bridge config is its model config plus a few bridge fields. Here it is
``HookedTransformerConfig`` with those fields and the bridge's defaults (``act_fn="relu"``,
``tokenizer_prepends_bos=True``); hooked_attn builds a ``HookedTransformer`` from it, never a bridge.
"""

from dataclasses import dataclass

from hooked_attn.compat.transformer_lens.HookedTransformerConfig import HookedTransformerConfig


@dataclass
class TransformerBridgeConfig(HookedTransformerConfig):
    act_fn: str | None = "relu"
    tokenizer_prepends_bos: bool | None = True
    architecture: str | None = None
    tokenizer_appends_eos: bool = False
    default_padding_side: str | None = None

    def to_hooked_transformer_config(self) -> HookedTransformerConfig:
        """The same model as a ``HookedTransformerConfig`` (the bridge-only fields dropped)."""
        fields = {k: v for k, v in self.to_dict().items()
                  if k not in ("architecture", "tokenizer_appends_eos", "default_padding_side", "n_params")}
        return HookedTransformerConfig(**fields)


__all__ = ["TransformerBridgeConfig"]
