"""``transformer_lens.HookedRootModule``: hooked_attn's HookedRootModule."""

from hooked_attn.hook_points import HookedRootModule

__all__ = ["HookedRootModule"]
