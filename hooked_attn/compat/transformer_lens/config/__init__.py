"""``transformer_lens.config``: the model configs."""

from hooked_attn.compat.transformer_lens.HookedTransformerConfig import HookedTransformerConfig
from hooked_attn.compat.transformer_lens.config.transformer_bridge_config import TransformerBridgeConfig
from hooked_attn.compat.transformer_lens.config.transformer_lens_config import TransformerLensConfig

__all__ = ["HookedTransformerConfig", "TransformerBridgeConfig", "TransformerLensConfig"]
