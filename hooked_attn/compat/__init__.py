"""Compatibility layers that let code written for other libraries run on hooked_attn."""

import importlib
import pkgutil
import sys

_TL = "transformer_lens"
_OURS = "hooked_attn.compat.transformer_lens"


def install_as_transformer_lens() -> None:
    """Make ``import transformer_lens`` (and its submodules) load hooked_attn's compatibility layer.

    Like PyMySQL's ``install_as_MySQLdb()``: call it before the code that imports TransformerLens.
    It replaces an already-imported TransformerLens in ``sys.modules`` for later imports only;
    objects taken from the real package before the call stay what they were.
    """
    package = importlib.import_module(_OURS)
    sys.modules[_TL] = package
    for info in pkgutil.walk_packages(package.__path__, prefix=_OURS + "."):
        module = importlib.import_module(info.name)
        sys.modules[_TL + info.name[len(_OURS):]] = module


__all__ = ["install_as_transformer_lens"]
