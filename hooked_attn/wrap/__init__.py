"""Hooks for any PyTorch attention: ``wrap()`` / ``unwrap()`` and the hooked ``nn.MultiheadAttention``."""

from hooked_attn.wrap.mha import HookedMultiheadAttention
from hooked_attn.wrap.root import WrappedModule, unwrap, wrap

__all__ = ["HookedMultiheadAttention", "WrappedModule", "unwrap", "wrap"]
