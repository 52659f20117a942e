"""wrap() and unwrap(): hook points in any PyTorch model, through its ``nn.MultiheadAttention`` modules.

``wrap(model)`` swaps every ``nn.MultiheadAttention`` inside ``model`` for a
``HookedMultiheadAttention`` that shares its parameters, and returns a ``WrappedModule``: a
``HookedRootModule`` that calls ``model`` and names each hook point after its path inside ``model``
(``layers.0.self_attn.hook_pattern``). ``unwrap`` puts the original modules back.
"""

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from hooked_attn.hook_points import HookedRootModule, HookPoint
from hooked_attn.wrap.mha import HookedMultiheadAttention

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Slot:
    """Where one attention module sits: ``parent._modules[key]``, reached at ``path``."""

    parent: nn.Module
    key: str
    path: str


class WrappedModule(HookedRootModule):
    """What ``wrap`` returns: calls the model it holds, with ``run_with_cache``, ``run_with_hooks`` etc.

    ``module`` is the wrapped model itself (its attention modules swapped); ``hook_dict`` lists the
    hook points by name, the path inside ``module`` (no ``module.`` prefix).
    """

    def __init__(self, module: nn.Module, root: nn.Module, slots: list[_Slot],
                 nested_flags: dict[nn.TransformerEncoder, bool]) -> None:
        super().__init__()
        self.module = module
        # Plain attributes, not submodules: unwrap's bookkeeping, not part of the model.
        object.__setattr__(self, "_root", root)
        object.__setattr__(self, "_slots", slots)
        object.__setattr__(self, "_nested_flags", nested_flags)
        self._unwrapped = False
        self.setup()

    def setup(self) -> None:
        """Name every HookPoint after its path inside ``module`` (``""`` is ``module`` itself)."""
        self.mod_dict = {}
        self.hook_dict = {}
        for name, sub in self.module.named_modules():
            self.mod_dict[name] = sub
            if isinstance(sub, HookPoint):
                sub.name = name
                self.hook_dict[name] = sub

    @property
    def attention_paths(self) -> list[str]:
        """The path of every swapped ``nn.MultiheadAttention`` (each place it sat, if it was shared)."""
        return [slot.path for slot in self._slots]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._unwrapped:
            raise RuntimeError("this WrappedModule was unwrapped; call the module unwrap() returned, or wrap it again")
        return self.module(*args, **kwargs)


def _attention_slots(module: nn.Module) -> Iterator[_Slot]:
    """Every (parent, key) whose child is an nn.MultiheadAttention, once each, in module order."""
    seen: set[tuple[int, str]] = set()
    for parent_path, parent in module.named_modules(remove_duplicate=False):
        for key, child in parent._modules.items():
            if isinstance(child, nn.MultiheadAttention) and (id(parent), key) not in seen:
                seen.add((id(parent), key))
                yield _Slot(parent, key, f"{parent_path}.{key}" if parent_path else key)


def _check_wrappable(module: nn.Module) -> None:
    if isinstance(module, WrappedModule):
        raise ValueError("this module is already wrapped (wrap() returned it); wrapping twice is not supported")
    if isinstance(module, HookedRootModule):
        raise ValueError(f"{type(module).__name__} is already a HookedRootModule: use its own run_with_cache")
    for path, sub in module.named_modules():
        where = f"{path!r}" if path else "the module itself"
        if isinstance(sub, HookedMultiheadAttention):
            raise ValueError(
                f"{where} is already a HookedMultiheadAttention: this module was wrapped before. "
                "Use the WrappedModule wrap() returned, or unwrap() it first"
            )
        if path and isinstance(sub, HookedRootModule):
            raise ValueError(f"{where} is a {type(sub).__name__}, which names its own hook points; wrap cannot rename them")
        if isinstance(sub, nn.MultiheadAttention) and type(sub).forward is not nn.MultiheadAttention.forward:
            raise ValueError(
                f"{where} is a {type(sub).__name__}, a subclass of nn.MultiheadAttention with its own forward; "
                "wrap only reproduces nn.MultiheadAttention.forward"
            )


def wrap(module: nn.Module) -> WrappedModule:
    """Hook points in any model: every ``nn.MultiheadAttention`` inside ``module`` gets hooks.

    Each ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``,
    ``nn.TransformerDecoderLayer`` and ``nn.Transformer``) is replaced, in place, by a
    ``HookedMultiheadAttention`` that shares its parameters and computes the same outputs. HookPoints
    already in the model (``DotProductAttention``, ``AdditiveAttention``) are named too.
    ``nn.TransformerEncoder``'s nested-tensor fast path, which would skip the attention modules'
    forward, is switched off until ``unwrap``.

    Args:
        module: any model; it is modified in place and held by the returned wrapper.

    Returns:
        A ``WrappedModule``: calling it calls ``module``; ``hook_dict`` lists the hook names, e.g.
        ``layers.0.self_attn.hook_pattern``; ``run_with_cache`` and ``run_with_hooks`` work as on
        ``HookedTransformer``.

    Raises:
        ValueError: ``module`` is already wrapped, contains a ``HookedRootModule``, contains a
            subclass of ``nn.MultiheadAttention`` that overrides ``forward``, or has neither an
            ``nn.MultiheadAttention`` nor a HookPoint. ``module`` is left unchanged.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"wrap takes an nn.Module, got {type(module).__name__}")
    _check_wrappable(module)
    slots = list(_attention_slots(module))
    if not slots and not isinstance(module, nn.MultiheadAttention) and not any(
        isinstance(sub, HookPoint) for sub in module.modules()
    ):
        raise ValueError(
            f"{type(module).__name__} contains no nn.MultiheadAttention and no HookPoint: there is nothing to hook"
        )
    hooked: dict[int, HookedMultiheadAttention] = {}

    def hooked_for(original: nn.MultiheadAttention) -> HookedMultiheadAttention:
        # One replacement per original object, so an attention module shared by two paths stays shared.
        if id(original) not in hooked:
            if original._forward_hooks or original._forward_pre_hooks or original._backward_hooks:
                logger.warning("%s has torch forward/backward hooks; they do not run on its hooked replacement",
                               type(original).__name__)
            hooked[id(original)] = HookedMultiheadAttention(original)
        return hooked[id(original)]

    new_root = hooked_for(module) if isinstance(module, nn.MultiheadAttention) else module
    nested_flags = {enc: enc.use_nested_tensor for enc in module.modules()
                    if isinstance(enc, nn.TransformerEncoder) and hasattr(enc, "use_nested_tensor")}
    for slot in slots:
        slot.parent._modules[slot.key] = hooked_for(slot.parent._modules[slot.key])  # type: ignore[arg-type]
    for enc in nested_flags:
        enc.use_nested_tensor = False
    n_attn = len(hooked)
    logger.info("wrapped %d nn.MultiheadAttention module(s) in %s", n_attn, type(module).__name__)
    return WrappedModule(new_root, module, slots, nested_flags)


def unwrap(wrapped: WrappedModule) -> nn.Module:
    """Put the original ``nn.MultiheadAttention`` objects back and return the original model.

    The wrapper is dead afterwards (calling it raises). Parameters replaced on a hooked module
    since ``wrap`` (``load_state_dict(assign=True)``, say), its train/eval mode and its dropout
    carry over to the original module.

    Raises:
        TypeError: ``wrapped`` is not what ``wrap`` returned.
        ValueError: it was unwrapped already, or a hooked attention module is no longer where
            ``wrap`` put it (nothing is changed then).
    """
    if not isinstance(wrapped, WrappedModule):
        hint = ""
        if isinstance(wrapped, nn.Module) and any(isinstance(m, HookedMultiheadAttention) for m in wrapped.modules()):
            hint = " (this looks like the model inside one: pass the WrappedModule itself)"
        raise TypeError(f"unwrap takes the WrappedModule that wrap() returned, got {type(wrapped).__name__}{hint}")
    if wrapped._unwrapped:
        raise ValueError("this WrappedModule was unwrapped already")
    for slot in wrapped._slots:
        current = slot.parent._modules.get(slot.key)
        if not isinstance(current, HookedMultiheadAttention):
            raise ValueError(
                f"{slot.path!r} is no longer a HookedMultiheadAttention (found {type(current).__name__}); "
                "the model was changed after wrap(), so unwrap cannot restore it"
            )
    restored: set[int] = set()
    for slot in wrapped._slots:
        current = slot.parent._modules[slot.key]
        assert isinstance(current, HookedMultiheadAttention)
        slot.parent._modules[slot.key] = _sync_back(current) if id(current) not in restored else current.original
        restored.add(id(current))
    if isinstance(wrapped.module, HookedMultiheadAttention):
        _sync_back(wrapped.module)
    for enc, flag in wrapped._nested_flags.items():
        enc.use_nested_tensor = flag
    wrapped._unwrapped = True
    return wrapped._root


def _sync_back(hooked: HookedMultiheadAttention) -> nn.MultiheadAttention:
    """The original module, given any parameter, mode or dropout change made on its replacement."""
    original: nn.MultiheadAttention = hooked.original  # type: ignore[assignment]
    for name, param in hooked._parameters.items():
        if original._parameters.get(name) is not param:
            original._parameters[name] = param
    if original.out_proj is not hooked.out_proj:
        original.out_proj = hooked.out_proj
    original.train(hooked.training)
    original.dropout = hooked.dropout
    return original
