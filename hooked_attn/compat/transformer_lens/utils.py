"""``transformer_lens.utils``: the same helpers as ``transformer_lens.utilities``."""

from hooked_attn.compat.transformer_lens.utilities import *  # noqa: F401,F403
from hooked_attn.compat.transformer_lens.utilities import __all__  # noqa: F401
