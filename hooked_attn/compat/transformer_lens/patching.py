"""``transformer_lens.patching``: hooked_attn's activation, path and attribution patching."""

from hooked_attn.patching import *  # noqa: F401,F403
from hooked_attn.patching import __dict__ as _all

__all__ = [name for name in _all if not name.startswith("_")]
