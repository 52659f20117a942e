"""``transformer_lens.hook_points``: HookPoint and the hook handle TransformerLens returns.

``HookedRootModule`` moved to ``transformer_lens.HookedRootModule`` in TransformerLens 3.x; importing
it from here still works and warns (DeprecationWarning), as TransformerLens 3.x does.
"""

import warnings
from typing import Any

from hooked_attn.hook_points import HookIntrospectionMixin, HookPoint, LensHandle, NamesFilter


def __getattr__(name: str) -> Any:
    if name == "HookedRootModule":
        warnings.warn("import HookedRootModule from transformer_lens.HookedRootModule; "
                      "transformer_lens.hook_points.HookedRootModule is deprecated", DeprecationWarning, stacklevel=2)
        from hooked_attn.hook_points import HookedRootModule

        return HookedRootModule
    raise AttributeError(f"module 'transformer_lens.hook_points' has no attribute {name!r}")


__all__ = ["HookIntrospectionMixin", "HookPoint", "LensHandle", "NamesFilter"]
