"""Hooks for any PyTorch attention: ``wrap()`` / ``unwrap()``, the hooked ``nn.MultiheadAttention``, the
SDPA call sites, and ``wrap_hf``, the fallback for HF families this library does not rebuild."""

from hooked_attn.wrap.fallback import WrappedHFModel, wrap_hf
from hooked_attn.wrap.mha import HookedMultiheadAttention
from hooked_attn.wrap.root import WrappedModule, unwrap, wrap
from hooked_attn.wrap.sdpa import AttentionSite

__all__ = ["AttentionSite", "HookedMultiheadAttention", "WrappedHFModel", "WrappedModule", "unwrap", "wrap", "wrap_hf"]
