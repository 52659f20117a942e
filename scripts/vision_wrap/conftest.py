"""Lets torchvision's pure-Python parts import where its compiled ops cannot load.

The torchvision build for torch 2.13 that the registry ships (0.28.0, '+cu130') links its ``_C.so``
against libtorch_cuda.so, which the CPU torch here does not have. torchvision expects that and runs
on without its C++ ops (``torchvision.extension._has_ops()`` is False; ``torchvision.ops.nms`` and the
other compiled ops then raise torchvision's own "Couldn't load custom C++ ops" error), except for one
line: ``_meta_registrations.py`` registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms``
unconditionally, and torch refuses ("operator torchvision::nms does not exist"), so ``import
torchvision`` fails, and with it timm and transformers' vision models. Declaring those two operator
schemas (no kernel) before the import lets that line pass; nothing of torchvision is changed, and
nothing is declared where its ``_C.so`` loads. The models tested here never call a compiled op.
"""

import ctypes
import importlib.util
from pathlib import Path

import torch

_declared: torch.library.Library | None = None  # kept alive: the declarations last as long as this object


def _declare_ops_if_the_extension_cannot_load() -> None:
    global _declared
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    extension = next(Path(spec.origin).parent.glob("_C.*so"), None)
    try:
        if extension is not None:
            ctypes.CDLL(str(extension))
            return
    except OSError:
        pass
    _declared = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        _declared.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


_declare_ops_if_the_extension_cannot_load()
