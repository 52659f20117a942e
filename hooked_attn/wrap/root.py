"""wrap() and unwrap(): hook points at every attention computation of any PyTorch model.

``wrap(model)`` swaps every ``nn.MultiheadAttention`` inside ``model`` for a
``HookedMultiheadAttention`` that shares its parameters, and returns a ``WrappedModule``: a
``HookedRootModule`` that calls ``model`` and names each hook point after its path inside ``model``
(``layers.0.self_attn.hook_pattern``). Every other ``scaled_dot_product_attention`` call gets hook
points named after the module that makes it (``capture.py``); they are found by running the model
once (``discover``, done by the first ``run_with_cache``/``run_with_hooks``). ``unwrap`` puts the
original modules back.
"""

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hooked_attn.hook_points import HookedRootModule, HookPoint, is_hooked
from hooked_attn.wrap.capture import ModuleTracker, SdpaCapture
from hooked_attn.wrap.mha import HookedMultiheadAttention
from hooked_attn.wrap.sdpa import AttentionSite

_SITE_LOCK = threading.Lock()  # new SDPA call sites are registered one at a time (module-level: deepcopy-able)

# Short names ``cache[site, layer]`` and ``resolve_act_name`` understand, and the hook each one means.
_ATTN_SITES = {"q": "hook_q", "k": "hook_k", "v": "hook_v", "attn_scores": "hook_attn_scores",
               "scores": "hook_attn_scores", "pattern": "hook_pattern", "attn": "hook_pattern", "z": "hook_z",
               "result": "hook_result"}

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
    hook points by name, the path inside ``module`` (no ``module.`` prefix). ``attention_layers``
    lists the attention hook prefixes in call order: ``cache["pattern", i]`` is the i-th one's pattern.
    """

    def __init__(self, module: nn.Module, root: nn.Module, slots: list[_Slot],
                 nested_flags: dict[nn.TransformerEncoder, bool]) -> None:
        super().__init__()
        self.module = module
        # Plain attributes, not submodules: unwrap's bookkeeping, not part of the model.
        object.__setattr__(self, "_root", root)
        object.__setattr__(self, "_slots", slots)
        object.__setattr__(self, "_nested_flags", nested_flags)
        # SDPA call sites by (module path, call index); their hook points live here, not in the model.
        object.__setattr__(self, "_sites", {})
        # Each site's _modules dict (read live: a user may swap a hook point for another module).
        self._site_modules: list[dict[str, nn.Module | None]] = []
        self._mha_layers = list(dict.fromkeys(slot.path for slot in slots))
        self._call_order: list[str] = []
        self._mha_calls: dict[str, int] = {}  # calls per swapped module in the discovering forward
        self._discovering = False
        self.discovered = False
        self._unwrapped = False
        paths = {sub: name for name, sub in module.named_modules()}
        object.__setattr__(self, "_tracker", ModuleTracker(paths, skip=(HookedMultiheadAttention,)))
        self._tracker.on_enter = self._record_mha
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
        for site in self._sites.values():
            self._name_site(site)

    @property
    def attention_paths(self) -> list[str]:
        """The path of every swapped ``nn.MultiheadAttention`` (each place it sat, if it was shared)."""
        return [slot.path for slot in self._slots]

    @property
    def sites(self) -> dict[str, AttentionSite]:
        """The discovered ``scaled_dot_product_attention`` call sites by hook prefix (``layers.0.call_1``).
        Each holds that call's six hook points as ``hook_q`` ... ``hook_z``."""
        return {site.prefix: site for site in list(self._sites.values())}

    @property
    def attention_layers(self) -> list[str]:
        """Every attention hook prefix, ``cache["pattern", i]``'s ``i``-th: in the order of the
        discovering forward's calls (``nn.MultiheadAttention`` paths and SDPA call sites), or, before
        ``discover``, the ``nn.MultiheadAttention`` paths in module order."""
        return list(self._call_order) if self.discovered else list(self._mha_layers)

    def resolve_act_name(self, name: str, layer: int | None = None, *_: Any) -> str | None:
        """The hook name ``cache[name, layer]`` means here (``"pattern", 2`` -> the third attention
        layer's ``hook_pattern``), or None when ``name`` is not an attention site or ``layer`` is missing."""
        layers = self.attention_layers
        if name not in _ATTN_SITES or layer is None:
            return None
        if not -len(layers) <= layer < len(layers):
            raise IndexError(f"layer {layer} is out of range: this model has {len(layers)} attention layers "
                             f"({', '.join(layers[:4])}{' ...' if len(layers) > 4 else ''})")
        prefix = layers[layer]
        return f"{prefix}.{_ATTN_SITES[name]}" if prefix else _ATTN_SITES[name]

    def discover(self, *args: Any, **kwargs: Any) -> "WrappedModule":
        """Run the model once on these inputs (no gradients, random state restored) to find and name
        its ``scaled_dot_product_attention`` calls; ``run_with_cache`` and ``run_with_hooks`` do it
        on their first call. A call site seen for the first time in a later forward gets its hook
        points then. Returns ``self``."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        self._call_order.clear()
        self._mha_calls = {}
        self._discovering = True
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                self._captured_forward(args, kwargs)
        finally:
            self._discovering = False
        self.discovered = True
        if not self._call_order and not self.hook_dict:
            logger.warning("%s made no scaled_dot_product_attention call and has no attention module: "
                           "there is nothing to hook", type(self.module).__name__)
        silent = [path for path in _own_forward_mha(self.module)
                  if not any(site.path == path or site.path.startswith(f"{path}.") for site in self._sites.values())]
        if silent:
            logger.warning("nn.MultiheadAttention subclass(es) with their own forward at %s made no "
                           "multi_head_attention_forward or scaled_dot_product_attention call in this forward: "
                           "they have no attention hooks", ", ".join(repr(p) for p in silent))
        repeated = {path: n for path, n in self._mha_calls.items() if n > 1}
        if repeated:
            logger.warning("nn.MultiheadAttention module(s) called more than once in one forward: %s. Their hook "
                           "points fire on every call, so a cache keeps only the last call's activations and a "
                           "hook edits every call", ", ".join(f"{p!r} ({n} calls)" for p, n in repeated.items()))
        return self

    def _record_mha(self, module: nn.Module, path: str) -> None:
        if self._discovering and isinstance(module, HookedMultiheadAttention):
            layer = path.lstrip("\0")
            self._mha_calls[layer] = self._mha_calls.get(layer, 0) + 1
            if layer not in self._call_order:
                self._call_order.append(layer)

    def _site_for(self, path: str, call: int) -> AttentionSite:
        site = self._sites.get((path, call))
        if site is not None:
            if self._discovering and site.prefix not in self._call_order:
                self._call_order.append(site.prefix)
            return site
        with _SITE_LOCK:
            prefix = path if call == 0 else (f"{path}.call_{call}" if path else f"call_{call}")
            if any(name in self.hook_dict for name in self._site_names(prefix)):
                prefix = f"{prefix}.sdpa" if prefix else "sdpa"  # the module has hook points of its own
            site = AttentionSite(path, call, prefix)
            self._sites[(path, call)] = site
            self._name_site(site)
            self._site_modules.append(site._modules)
            if site.prefix not in self._call_order:
                self._call_order.append(site.prefix)
        return site

    @staticmethod
    def _site_names(prefix: str) -> list[str]:
        return [f"{prefix}.hook_{s}" if prefix else f"hook_{s}" for s in ("q", "k", "v", "attn_scores", "pattern", "z")]

    def _name_site(self, site: AttentionSite) -> None:
        for name, point in zip(self._site_names(site.prefix), site.points().values(), strict=True):
            if isinstance(point, HookPoint):  # not a module swapped in for one
                point.name = name
                self.hook_dict[name] = point
        self.mod_dict.setdefault(site.prefix, site)

    def _captured_forward(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        with self._tracker, SdpaCapture(self._tracker, self._site_for):
            return self.module(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._unwrapped:
            raise RuntimeError("this WrappedModule was unwrapped; call the module unwrap() returned, or wrap it again")
        # HookPoint._active is what has_hooks reports, read without building its _HookState: this check
        # is the wrapper's whole per-forward work when nothing is hooked (benchmarks/bench_wrap.py).
        # Any other module a user put at a site counts as hooked (is_hooked).
        if any(point._active if type(point) is HookPoint else is_hooked(point)
               for modules in self._site_modules for point in modules.values()):
            return self._captured_forward(args, kwargs)
        return self.module(*args, **kwargs)

    def run_with_cache(self, *model_args: Any, **kwargs: Any) -> Any:
        if not self.discovered:
            self.discover(*model_args, **{k: v for k, v in kwargs.items() if k not in _CACHE_OPTIONS})
        return super().run_with_cache(*model_args, **kwargs)

    def run_with_hooks(self, *model_args: Any, **kwargs: Any) -> Any:
        if not self.discovered:
            self.discover(*model_args, **{k: v for k, v in kwargs.items() if k not in _HOOK_OPTIONS})
        return super().run_with_hooks(*model_args, **kwargs)

    def _raise_unknown_hook(self, name: str) -> None:
        if not self.discovered:
            raise KeyError(f"unknown hook name {name!r}: the attention calls of this model are not discovered "
                           "yet; run wrapped.discover(*inputs) (or run_with_cache once) first")
        super()._raise_unknown_hook(name)


_HOOK_OPTIONS = frozenset({"fwd_hooks", "bwd_hooks", "reset_hooks_end", "clear_contexts", "check_finite"})
_CACHE_OPTIONS = frozenset({"names_filter", "device", "dtype", "remove_batch_dim", "incl_bwd", "reset_hooks_end",
                            "clear_contexts", "check_finite"})


def _swappable(module: nn.Module) -> bool:
    """An nn.MultiheadAttention whose forward is torch's, which HookedMultiheadAttention reproduces. A
    subclass with a forward of its own stays in place: its calls of torch's attention are caught instead."""
    return isinstance(module, nn.MultiheadAttention) and type(module).forward is nn.MultiheadAttention.forward


def _own_forward_mha(module: nn.Module) -> dict[str, nn.MultiheadAttention]:
    """The nn.MultiheadAttention subclasses with their own forward (left in place), by path."""
    return {path: sub for path, sub in module.named_modules()
            if isinstance(sub, nn.MultiheadAttention) and not _swappable(sub)}


def _keep_forward(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing. On an nn.MultiheadAttention subclass left in place, its
    presence stops nn.TransformerEncoderLayer's fused inference path, which would skip the subclass's
    forward in unhooked runs only (torch's own inconsistency), so hooked and unhooked runs agree."""


def _remove_keep_forward(module: nn.Module) -> None:
    for sub in _own_forward_mha(module).values():
        for key, hook in list(sub._forward_pre_hooks.items()):
            if hook is _keep_forward:
                del sub._forward_pre_hooks[key]


def _attention_slots(module: nn.Module) -> Iterator[_Slot]:
    """Every (parent, key) whose child is a swappable nn.MultiheadAttention, once each, in module order."""
    seen: set[tuple[int, str]] = set()
    for parent_path, parent in module.named_modules(remove_duplicate=False):
        for key, child in parent._modules.items():
            if _swappable(child) and (id(parent), key) not in seen:
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


def wrap(module: nn.Module) -> WrappedModule:
    """Hook points in any model: every attention computation inside ``module`` gets hooks.

    Each ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``,
    ``nn.TransformerDecoderLayer`` and ``nn.Transformer``) is replaced, in place, by a
    ``HookedMultiheadAttention`` that shares its parameters and computes the same outputs. Every other
    call to ``torch.nn.functional.scaled_dot_product_attention`` made during a forward gets
    ``hook_q``, ``hook_k``, ``hook_v``, ``hook_attn_scores``, ``hook_pattern`` and ``hook_z``, named
    after the calling module (``encoder.layer.0.attention.attention.hook_pattern``; its second call
    in one forward ``....call_1.hook_pattern``). Those are found by running the model
    (``WrappedModule.discover``; the first ``run_with_cache``/``run_with_hooks`` does it). HookPoints
    already in the model (``DotProductAttention``, ``AdditiveAttention``) are named too.
    ``nn.TransformerEncoder``'s nested-tensor fast path, which would skip the attention modules'
    forward, is switched off until ``unwrap``. A subclass of ``nn.MultiheadAttention`` with a forward
    of its own stays in place: the ``F.multi_head_attention_forward`` (or SDPA) calls it makes (through
    ``super().forward`` say) get the SDPA call-site hooks under its path; ``discover`` warns when one
    makes no such call. It gets an empty forward pre-hook (removed by ``unwrap``) so that
    ``nn.TransformerEncoderLayer``'s fused path, which would skip its forward, does not run.

    Args:
        module: any model; it is modified in place and held by the returned wrapper.

    Returns:
        A ``WrappedModule``: calling it calls ``module``; ``hook_dict`` lists the hook names, e.g.
        ``layers.0.self_attn.hook_pattern``; ``run_with_cache`` and ``run_with_hooks`` work as on
        ``HookedTransformer``.

    Raises:
        ValueError: ``module`` is already wrapped or contains a ``HookedRootModule``. ``module`` is
            left unchanged.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"wrap takes an nn.Module, got {type(module).__name__}")
    _check_wrappable(module)
    slots = list(_attention_slots(module))
    hooked: dict[int, HookedMultiheadAttention] = {}

    def hooked_for(original: nn.MultiheadAttention) -> HookedMultiheadAttention:
        # One replacement per original object, so an attention module shared by two paths stays shared.
        if id(original) not in hooked:
            if original._forward_hooks or original._forward_pre_hooks or original._backward_hooks:
                logger.warning("%s has torch forward/backward hooks; they do not run on its hooked replacement",
                               type(original).__name__)
            hooked[id(original)] = HookedMultiheadAttention(original)
        return hooked[id(original)]

    new_root = hooked_for(module) if _swappable(module) else module
    nested_flags = {enc: enc.use_nested_tensor for enc in module.modules()
                    if isinstance(enc, nn.TransformerEncoder) and hasattr(enc, "use_nested_tensor")}
    for slot in slots:
        slot.parent._modules[slot.key] = hooked_for(slot.parent._modules[slot.key])  # type: ignore[arg-type]
    for enc in nested_flags:
        enc.use_nested_tensor = False
    for sub in _own_forward_mha(module).values():
        if _keep_forward not in sub._forward_pre_hooks.values():
            sub.register_forward_pre_hook(_keep_forward)
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
    _remove_keep_forward(wrapped._root)
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
