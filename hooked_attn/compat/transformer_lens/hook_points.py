"""``transformer_lens.hook_points``: HookPoint, HookedRootModule and the hook handle TransformerLens returns."""

from hooked_attn.hook_points import HookedRootModule, HookIntrospectionMixin, HookPoint, LensHandle, NamesFilter

__all__ = ["HookIntrospectionMixin", "HookPoint", "HookedRootModule", "LensHandle", "NamesFilter"]
