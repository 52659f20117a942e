"""The fallback for HF models this library does not rebuild: the HF model itself, wrapped, with a hook
at every module's output (under its HF module path) and at every attention call.

``wrap_hf(source)`` loads (or takes) the HF model with ``attn_implementation="sdpa"`` and returns a
``WrappedHFModel``: ``wrap``'s attention hooks (``model.layers.0.self_attn.hook_pattern``) plus
``{module path}.hook_out`` for every module, so ``run_with_cache``, ``run_with_hooks`` and activation
patching work on any family. ``HookedTransformer.from_pretrained(..., fallback="wrap")`` returns it for an
unregistered architecture.
"""

import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from hooked_attn.hook_points import HookPoint
from hooked_attn.wrap.root import WrappedModule, _attention_slots, _check_wrappable

logger = logging.getLogger(__name__)

OUT = "hook_out"
FALLBACK_HINT = ("For any HF model, HookedTransformer.from_pretrained(..., fallback='wrap') (or "
                 "hooked_attn.wrap.wrap_hf(source)) returns the HF model itself, wrapped: a hook at every module "
                 "output ({module path}.hook_out) and at every attention call (docs/wrapping.md)")


class WrappedHFModel(WrappedModule):
    """A wrapped model with a ``hook_out`` point at every module's output, as well as the attention hooks.

    ``{path}.hook_out`` sees the module's output when it is a tensor, or the first element when it is a
    tuple or list starting with one (HF layers that also return attention weights or caches); other
    outputs (an HF ``ModelOutput``) pass by unhooked. A replacement from a hook takes that place in the
    output. Torch forward hooks are attached only to modules whose point has hooks, and only during a
    forward, so an unhooked forward runs the HF model untouched.
    """

    def __init__(self, wrapped: WrappedModule) -> None:
        super().__init__(wrapped.module, wrapped._root, wrapped._slots, wrapped._nested_flags)
        wrapped._unwrapped = True  # this one takes over

    def setup(self) -> None:
        super().setup()
        object.__setattr__(self, "_outputs", getattr(self, "_outputs", {}))
        for path, module in self.module.named_modules():
            if isinstance(module, HookPoint):
                continue
            name = f"{path}.{OUT}" if path else OUT
            point = self._outputs.get(path)
            if point is None:
                point = self._outputs[path] = HookPoint()
            point.name = name
            self.hook_dict[name] = point

    def _output_hooks(self) -> Iterator[torch.utils.hooks.RemovableHandle]:
        for path, point in self._outputs.items():
            if point._active:  # has_hooks, without building its _HookState for each of the model's modules
                yield self.mod_dict[path].register_forward_hook(_through(point))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        handles = list(self._output_hooks())
        try:
            return super().forward(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()


def _through(point: HookPoint):
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, Tensor):
            return point(output)
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            return type(output)([point(output[0]), *output[1:]])
        return None

    return hook


def wrap_hf(source: str | os.PathLike | nn.Module, *, dtype: torch.dtype = torch.float32,
            device: torch.device | str | None = None, **hf_kwargs: Any) -> WrappedHFModel:
    """The HF model at ``source`` (a folder, a hub id, or an in-memory ``PreTrainedModel``), wrapped.

    It runs with ``attn_implementation="sdpa"`` (which ``wrap`` hooks); a model built with another
    implementation is switched to SDPA. Loaded models use the class named in the config's
    ``architectures``.

    Args:
        source: where the model is, or the model.
        dtype, device: for a model loaded here.
        hf_kwargs: passed to the HF class's ``from_pretrained``.

    Raises:
        ValueError: the config names no architecture transformers has, or the model cannot run SDPA.
    """
    import transformers

    if isinstance(source, nn.Module):
        model = source
    else:
        config = transformers.AutoConfig.from_pretrained(source)
        names = list(getattr(config, "architectures", None) or [])
        classes = [getattr(transformers, name, None) for name in names]
        if not names or classes[0] is None:
            raise ValueError(f"{source}: the config names architectures {names}; transformers "
                             f"{transformers.__version__} has no such class to load")
        model = classes[0].from_pretrained(source, dtype=dtype, attn_implementation="sdpa", **hf_kwargs)
        if device is not None:
            model = model.to(device)
        model.eval()
    if getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") != "sdpa":
        try:
            model.set_attn_implementation("sdpa")
        except (ValueError, AttributeError) as err:
            raise ValueError(f"{type(model).__name__} cannot run attn_implementation='sdpa', which wrap hooks: {err}"
                             ) from err
    from hooked_attn.wrap.root import wrap

    _check_wrappable(model)
    if list(_attention_slots(model)):
        logger.info("%s also holds nn.MultiheadAttention modules; they are swapped as wrap() does", type(model).__name__)
    return WrappedHFModel(wrap(model))
