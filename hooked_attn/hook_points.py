"""HookedRootModule, which names a model's HookPoints and adds, removes and runs with hooks; and,
re-exported from ``hooked_attn.hook_point``, HookPoint and its hook records (the public import path
for both).

Temporary hooks (``hooks()``, ``run_with_hooks``, ``run_with_cache``, ``check_finite``) belong to a
scope: they fire only in the thread that attached them (see ``hooked_attn.hook_point``). Hooks added
with ``add_hook`` are model-wide: they fire in every thread and every call.
"""

import contextlib
import difflib
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from hooked_attn.hook_point import (  # re-exported: the public names keep this import path
    Direction,
    HookDirectionError,  # noqa: F401
    HookFn,
    HookPairs,
    HookPoint,
    LensHandle,  # noqa: F401
    NamesFilter,
    NonFiniteActivationError,  # noqa: F401
    _Hook,
    _open_scope,
    _remove_added_on_error,
    is_hooked,  # noqa: F401
)

if TYPE_CHECKING:
    from hooked_attn.cache import ActivationCache


def _hook_pairs(hooks: Any, what: str) -> list[tuple[Any, HookFn]]:
    """``fwd_hooks``/``bwd_hooks`` as a list of (name or predicate, function) pairs, or a TypeError."""
    if isinstance(hooks, dict):
        raise TypeError(f"{what} must be a list of (name, hook) pairs, got a dict: pass list({what}.items())")
    if (isinstance(hooks, tuple) and len(hooks) == 2 and (isinstance(hooks[0], str) or callable(hooks[0]))
            and callable(hooks[1]) and not isinstance(hooks[0], tuple)):
        raise TypeError(f"{what} must be a list of (name, hook) pairs, got one bare pair: pass [{what}]")
    if isinstance(hooks, (str, bytes)) or not isinstance(hooks, Iterable):
        raise TypeError(f"{what} must be a list of (name, hook) pairs, got {type(hooks).__name__}")
    pairs = list(hooks)
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not callable(pair[1]):
            raise TypeError(f"each entry of {what} must be a (name, hook function) pair, got {pair!r}")
    return pairs  # type: ignore[return-value]


class HookIntrospectionMixin:
    """``list_hooks()`` for any object with a ``hook_dict`` of HookPoints (TransformerLens' mixin)."""

    def list_hooks(self, name_filter: "NamesFilter" = None, dir: str = "both",
                   including_permanent: bool = True) -> dict[str, list[_Hook]]:
        """The attached hooks by hook name (points without any are left out), optionally only
        those a name, list or predicate selects, in one direction, or not permanent."""
        points: dict[str, HookPoint] = getattr(self, "hook_dict")
        if isinstance(name_filter, str):
            name_filter = [name_filter]
        out = {}
        for name, point in points.items():
            if name_filter is not None and not (name_filter(name) if callable(name_filter) else name in name_filter):
                continue
            hooks = [h for h in point.list_hooks(dir) if including_permanent or not h.permanent]  # type: ignore[arg-type]
            if hooks:
                out[name] = hooks
        return out


class HookedRootModule(HookIntrospectionMixin, nn.Module):
    """A module whose HookPoints are found by name: adding, removing and running with hooks."""

    hook_dict: dict[str, HookPoint]
    mod_dict: dict[str, nn.Module]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A forward that raises takes with it the hooks attached while it ran (a hook function
        # that called add_hook and then failed), so a failed call leaves no hook behind.
        with _remove_added_on_error():
            return super().__call__(*args, **kwargs)

    def setup(self) -> None:
        """Name every HookPoint after its module path. Call at the end of ``__init__``."""
        self.mod_dict = {}
        self.hook_dict = {}
        for name, module in self.named_modules():
            if name:
                self.mod_dict[name] = module
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    def _opt_in_enabled(self, name: str) -> bool:
        """Whether the opt-in hook point ``name`` is switched on by its module's ``use_attn_result``."""
        return bool(getattr(self.mod_dict.get(name.rpartition(".")[0]), "use_attn_result", False))

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute and expose per-head outputs at ``attn.hook_result [batch pos head d_model]``."""
        for module in self.modules():
            if hasattr(module, "use_attn_result"):
                module.use_attn_result = use_attn_result

    def hook_points(self) -> list[HookPoint]:
        return list(self.hook_dict.values())

    def resolve_hook_names(self, names: NamesFilter) -> list[str]:
        """The hook names a name, a list of names or a predicate selects (None selects all).

        Raises:
            KeyError: a named hook does not exist; the message suggests the closest valid names.
        """
        if names is None:
            return list(self.hook_dict)
        if isinstance(names, str):
            names = [names]
        if callable(names):
            return [name for name in self.hook_dict if names(name)]
        if not isinstance(names, Iterable) or isinstance(names, (bytes, Tensor)):
            raise TypeError(f"names_filter must be a str, a list of str or a callable, got {type(names).__name__}")
        names = list(names)  # a generator is read once, here
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"hook names must be str, got {type(name).__name__}: {name!r}")
            if name not in self.hook_dict:
                self._raise_unknown_hook(name)
        return list(dict.fromkeys(names))

    def _selected_points(self, names: NamesFilter) -> list[str]:
        """``resolve_hook_names``, less the opt-in points (``hook_result``) that are off, unless named."""
        selected = self.resolve_hook_names(names)
        if names is None or callable(names):
            selected = [n for n in selected if not self.hook_dict[n].opt_in or self._opt_in_enabled(n)]
        return selected

    def _raise_unknown_hook(self, name: str) -> None:
        close = difflib.get_close_matches(name, self.hook_dict, n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown hook name {name!r} ({len(self.hook_dict)} hook points in this model).{hint}")

    def add_hook(
        self, name: str | Callable[[str], bool], hook: HookFn, dir: Direction = "fwd",
        is_permanent: bool = False, level: int | None = None, prepend: bool = False,
    ) -> list[tuple[HookPoint, _Hook]]:
        """Attach ``hook`` at one hook name, or at every name a predicate selects."""
        points = [self.hook_dict[n] for n in self.resolve_hook_names(name)]
        return [(p, p.add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend))
                for p in points]

    def add_perma_hook(self, name: str | Callable[[str], bool], hook: HookFn, dir: Direction = "fwd") -> None:
        """Attach a hook that ``reset_hooks()`` keeps unless ``including_permanent=True``."""
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def reset_hooks(
        self, clear_contexts: bool = True, direction: Literal["fwd", "bwd", "both"] = "both",
        including_permanent: bool = False, level: int | None = None,
    ) -> None:
        for point in self.hook_dict.values():
            point.remove_hooks(direction, including_permanent=including_permanent, level=level)
            if clear_contexts:
                point.clear_context()

    def clear_contexts(self) -> None:
        for point in self.hook_dict.values():
            point.clear_context()

    def n_hooks(self) -> int:
        """How many hook functions are attached now, over every hook point."""
        return sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in self.hook_dict.values())

    @contextlib.contextmanager
    def hooks(
        self, fwd_hooks: HookPairs = (),
        bwd_hooks: HookPairs = (),
        reset_hooks_end: bool = True, clear_contexts: bool = False,
    ) -> Iterator["HookedRootModule"]:
        """Attach hooks for the body of a ``with`` block; they are removed on exit, also on exceptions.

        Every name is checked before anything is attached, so a bad name leaves the model as it was.
        """
        resolved = [(self.resolve_hook_names(n), fn, d)
                    for hooks, d in ((_hook_pairs(fwd_hooks, "fwd_hooks"), "fwd"), (_hook_pairs(bwd_hooks, "bwd_hooks"), "bwd"))
                    for n, fn in hooks]
        added: list[tuple[HookPoint, _Hook]] = []
        with _open_scope() as scope:
            try:
                for names, fn, d in resolved:
                    for name in names:
                        point = self.hook_dict[name]
                        added.append((point, point.add_hook(fn, dir=d, scope=scope)))  # type: ignore[arg-type]
                yield self
            finally:
                for point, hook in added:
                    if reset_hooks_end:
                        point.remove(hook)
                    else:
                        hook.scope = None  # kept: from now on a model-wide hook
                if clear_contexts:
                    self.clear_contexts()

    @contextlib.contextmanager
    def check_finite(self, names_filter: NamesFilter = None) -> Iterator["HookedRootModule"]:
        """Within the block, raise NonFiniteActivationError at the first hook point whose activation
        holds a NaN or an inf, naming it. Opt-in: off, it costs nothing.

        The check at a point runs after the hooks attached there, so it also catches a hook that
        writes NaN. Integer activations (expert indices) are skipped. Checking every point takes the
        explicit attention and norm paths, which materialise what they check.

        Args:
            names_filter: the points to check (as in ``run_with_cache``); None checks all.
        """
        points = [self.hook_dict[n] for n in self._selected_points(names_filter)]
        with _open_scope() as scope:
            try:
                for point in points:
                    point.add_finite_check(scope)
                yield self
            finally:
                for point in points:
                    point.remove_finite_check(scope)

    def run_with_hooks(
        self, *model_args: Any, fwd_hooks: HookPairs = (),
        bwd_hooks: HookPairs = (), reset_hooks_end: bool = True,
        clear_contexts: bool = False, check_finite: bool = False, **model_kwargs: Any,
    ) -> Any:
        """Run the model with temporary hooks. Backward hooks attach to this forward's activations,
        so they fire on a later ``.backward()`` of the output even though they are removed on return.
        ``check_finite=True`` runs under ``self.check_finite()``."""
        checking = self.check_finite() if check_finite else contextlib.nullcontext()
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts), checking:
            return self(*model_args, **model_kwargs)

    def get_caching_hooks(
        self, names_filter: NamesFilter = None, incl_bwd: bool = False, device: torch.device | str | None = None,
        remove_batch_dim: bool = False, cache: dict[str, Tensor] | None = None, dtype: torch.dtype | None = None,
    ) -> tuple[dict[str, Tensor], list[tuple[str, HookFn]], list[tuple[str, HookFn]]]:
        """Hooks that store activations (and, with ``incl_bwd``, gradients under ``name + "_grad"``)."""
        cache = {} if cache is None else cache
        names = self._selected_points(names_filter)

        def save(tensor: Tensor, hook: HookPoint, suffix: str = "") -> None:
            stored = tensor.detach()
            if remove_batch_dim:
                if stored.ndim == 0 or stored.shape[0] != 1:
                    raise ValueError(f"remove_batch_dim=True needs a batch of 1, but {hook.name}{suffix} has shape "
                                     f"{tuple(stored.shape)}: run one sequence, or keep the batch dim")
                stored = stored[0]
            if device is not None or dtype is not None:
                stored = stored.to(device=device, dtype=dtype)
            cache[str(hook.name) + suffix] = stored

        fwd = [(name, save) for name in names]
        bwd = [(name, functools.partial(save, suffix="_grad")) for name in names] if incl_bwd else []
        return cache, fwd, bwd  # type: ignore[return-value]

    def run_with_cache(
        self, *model_args: Any, names_filter: NamesFilter = None, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None, remove_batch_dim: bool = False, incl_bwd: bool | Literal["deferred"] = False,
        reset_hooks_end: bool = True, clear_contexts: bool = False, check_finite: bool = False, **model_kwargs: Any,
    ) -> tuple[Any, "ActivationCache"]:
        """Run the model and return its output with an ActivationCache of the activations.

        Args:
            names_filter: a hook name, a list of names, or a predicate on names; None caches all
                (``hook_result`` only when ``use_attn_result`` is on or it is named).
            device, dtype: where and in what dtype to store the cached tensors.
            remove_batch_dim: store ``tensor[0]`` (for a batch of one).
            incl_bwd: also cache gradients as ``name + "_grad"``. ``True`` calls ``.backward()`` on the
                output, as TransformerLens does, so the output must be a scalar (``return_type="loss"``);
                ``"deferred"`` leaves the backward of a metric of your own to you (the gradients land in
                the returned cache when you call it).
            check_finite: raise NonFiniteActivationError at the first hook point holding NaN or inf.
        """
        from hooked_attn.cache import ActivationCache

        if incl_bwd not in (False, True, "deferred"):
            raise ValueError(f"incl_bwd must be False, True or 'deferred', got {incl_bwd!r}")
        cache, fwd, bwd = self.get_caching_hooks(
            names_filter, incl_bwd=bool(incl_bwd), device=device, remove_batch_dim=remove_batch_dim, dtype=dtype
        )
        checking = self.check_finite() if check_finite else contextlib.nullcontext()
        with self.hooks(fwd, bwd, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts), checking:
            out = self(*model_args, **model_kwargs)
            if incl_bwd is True:  # a backward hook that attaches hooks and fails leaves none either
                self._checked_backward(out)
        return out, ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)

    @staticmethod
    def _checked_backward(out: Any) -> None:
        if not isinstance(out, Tensor) or out.numel() != 1 or not out.requires_grad:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"incl_bwd=True calls .backward() on the output, as TransformerLens does, so the output "
                f"must be a scalar that requires grad (return_type='loss'); got {shape}. To backpropagate "
                "a metric of your own, pass incl_bwd='deferred' and call .backward() on it yourself")
        with _remove_added_on_error():
            out.backward()

    def cache_all(self, cache: dict[str, Tensor], names_filter: NamesFilter = None, **kwargs: Any) -> None:
        """Permanently-until-reset cache activations into ``cache`` (TransformerLens' ``cache_all``)."""
        _, fwd, bwd = self.get_caching_hooks(names_filter, cache=cache, **kwargs)
        for name, fn in fwd:
            self.add_hook(name, fn, "fwd")
        for name, fn in bwd:
            self.add_hook(name, fn, "bwd")
