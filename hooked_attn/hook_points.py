"""HookPoint, the identity module at every named activation, and HookedRootModule, which manages them.

A HookPoint costs one attribute check per call when nothing is attached. Hook functions take
``(activation, hook)`` and may return a replacement tensor of the same shape, dtype and device.

Temporary hooks (``hooks()``, ``run_with_hooks``, ``run_with_cache``, ``check_finite``) belong to a
*scope*: they fire only in the thread that attached them, and not in a model call made from inside a
hook function (which sees only model-wide hooks and the ones it attaches itself). So two threads can
use one model at once, and a hook may call the model without disturbing the outer call. Hooks added
with ``add_hook`` are model-wide: they fire in every thread and every call.
"""

import contextlib
import difflib
import functools
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import TypeCheckError
from torch import Tensor, nn

if TYPE_CHECKING:
    from hooked_attn.cache import ActivationCache

HookFn = Callable[..., Tensor | None]
NamesFilter = str | Iterable[str] | Callable[[str], bool] | None  # an iterator is read once
# (hook name or predicate, hook function) pairs. Typed loosely on purpose: a dict or one bare pair is
# refused by _hook_pairs with a message saying what to pass, rather than by a type checker.
HookPairs = Iterable[Any]
Direction = Literal["fwd", "bwd"]


class _Scope:
    """The owner of a group of temporary hooks (identity equality)."""


class _ThreadScopes(threading.local):
    """Per thread: a stack of frames, each the list of scopes active there. Calling a hook function
    pushes an empty frame, so a model call made inside a hook sees none of the outer call's scopes."""

    def __init__(self) -> None:
        self.frames: list[list[_Scope]] = [[]]


_SCOPES = _ThreadScopes()
_MUTATE = threading.RLock()  # attaching and removing hooks, from any thread


def _in_scope(scope: "_Scope | None") -> bool:
    return scope is None or scope in _SCOPES.frames[-1]


@contextlib.contextmanager
def _open_scope() -> Iterator[_Scope]:
    """A new scope, active in this thread's current frame for the body of the ``with``."""
    scope, frame = _Scope(), _SCOPES.frames[-1]
    frame.append(scope)
    try:
        yield scope
    finally:
        frame.remove(scope)


def _call_isolated(fn: HookFn, x: Tensor, point: "HookPoint") -> Tensor | None:
    """Call a hook function in a fresh frame: model calls inside it do not fire the outer scopes."""
    _SCOPES.frames.append([])
    try:
        return fn(x, hook=point)
    finally:
        _SCOPES.frames.pop()


@dataclass(eq=False)
class _Hook:
    """One attached hook function (identity equality, so each attachment is removable on its own).
    ``scope`` None: model-wide; otherwise it fires only where that scope is active."""

    fn: HookFn
    direction: Direction
    permanent: bool
    level: int | None
    scope: _Scope | None = None

    @property
    def is_permanent(self) -> bool:  # TransformerLens' LensHandle name
        return self.permanent

    @property
    def context_level(self) -> int | None:  # TransformerLens' LensHandle name
        return self.level

    @property
    def user_hook(self) -> HookFn:  # TransformerLens' LensHandle name
        return self.fn


LensHandle = _Hook  # TransformerLens' name for the record of one attached hook


class _HookState:
    """``point.has_hooks``: truthy when the point does anything but return its input (hooks
    attached, or the finite check on); called, it answers TransformerLens' ``has_hooks(dir=,
    including_permanent=, level=)`` about the attached hooks."""

    __slots__ = ("_point", "_active")

    def __init__(self, point: "HookPoint") -> None:
        self._point = point
        self._active = point._active  # a snapshot, so a saved value restores what it was

    def __bool__(self) -> bool:
        return self._active

    def __eq__(self, other: object) -> bool:
        return bool(self) == other

    def __hash__(self) -> int:
        return hash(bool(self))

    def __repr__(self) -> str:
        return repr(bool(self))

    def __call__(self, dir: str = "both", including_permanent: bool = True,
                 level: int | None = None) -> bool:
        if dir not in ("fwd", "bwd", "both"):
            raise HookDirectionError(f"dir must be 'fwd', 'bwd' or 'both', got {dir!r}")
        point = self._point
        hooks = (point.fwd_hooks if dir != "bwd" else []) + (point.bwd_hooks if dir != "fwd" else [])
        return any((including_permanent or not h.permanent) and (level is None or h.level == level) for h in hooks)


def _fn_name(fn: HookFn) -> str:
    if isinstance(fn, functools.partial):
        return _fn_name(fn.func)
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _check_replacement(point_name: str, fn: HookFn, kind: str, old: Tensor, new: object) -> Tensor:
    if not isinstance(new, Tensor):
        raise TypeError(
            f"hook {_fn_name(fn)!r} on {point_name!r} returned {type(new).__name__}; a {kind} hook must "
            "return None or a tensor"
        )
    if new.shape != old.shape:
        raise ValueError(
            f"hook {_fn_name(fn)!r} on {point_name!r} returned a {kind} tensor of shape {tuple(new.shape)}, "
            f"but the activation has shape {tuple(old.shape)}"
        )
    if new.dtype != old.dtype or new.device != old.device:
        raise ValueError(
            f"hook {_fn_name(fn)!r} on {point_name!r} returned a {kind} tensor with dtype {new.dtype} on "
            f"{new.device}, but the activation has dtype {old.dtype} on {old.device}"
        )
    return new


class HookDirectionError(ValueError, TypeCheckError):
    """A ``dir`` that is not "fwd", "bwd" or "both": a ValueError, and the runtime type-check error
    TransformerLens (whose ``dir`` is a checked ``Literal``) raises."""


class NonFiniteActivationError(FloatingPointError):
    """An activation holds NaN or inf; raised by the opt-in ``check_finite`` at the first such hook point.

    Attributes: ``hook_name``, ``n_nan``, ``n_inf``, ``first_index`` (of the first bad value) and ``shape``.
    """

    def __init__(self, hook_name: str, n_nan: int, n_inf: int, first_index: tuple[int, ...],
                 shape: tuple[int, ...]) -> None:
        self.hook_name, self.n_nan, self.n_inf = hook_name, n_nan, n_inf
        self.first_index, self.shape = first_index, shape
        super().__init__(
            f"{hook_name}: {n_nan} NaN and {n_inf} inf values (of {math.prod(shape)}) in an activation of "
            f"shape {shape}, the first at index {first_index}; every hook point checked before it was finite"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # picklable, for multiprocessing
        return type(self), (self.hook_name, self.n_nan, self.n_inf, self.first_index, self.shape)

    @classmethod
    def of(cls, hook_name: str, x: Tensor) -> "NonFiniteActivationError":
        first = (~torch.isfinite(x)).nonzero()[0]
        return cls(hook_name, int(torch.isnan(x).sum()), int(torch.isinf(x).sum()),
                   tuple(int(i) for i in first), tuple(x.shape))


class HookPoint(nn.Module):
    """An identity module that names an activation and runs the hooks attached to it.

    ``name`` is set by the root module's ``setup()``. ``ctx`` is a scratch dict hook functions
    may use to keep state between calls (cleared by ``reset_hooks(clear_contexts=True)``).
    """

    def __init__(self, opt_in: bool = False) -> None:
        super().__init__()
        self.name: str | None = None
        # An opt-in point (hook_result) is skipped when caching "everything"; name it to cache it.
        self.opt_in = opt_in
        self.ctx: dict[Any, Any] = {}
        self.fwd_hooks: list[_Hook] = []
        self.bwd_hooks: list[_Hook] = []
        # Set by HookedRootModule.check_finite (one entry per scope that asked): raise if the
        # activation (after any hooks) is not finite.
        self.finite_checks: list[_Scope] = []
        # Whether a call does anything but return its input: hooks attached, or the finite check on.
        self._active = False

    @property
    def has_hooks(self) -> _HookState:
        """Truthy when hooks are attached (or the finite check is on); ``has_hooks(dir="fwd",
        including_permanent=False, level=None)`` asks about particular hooks, as in TransformerLens."""
        return _HookState(self)

    @has_hooks.setter
    def has_hooks(self, active: object) -> None:
        """Force the point on (run ``_run`` on every call) or off (return the input untouched)."""
        self._active = bool(active)

    def list_hooks(self, dir: Literal["fwd", "bwd", "both"] = "both") -> list[_Hook]:
        """The attached hooks, forward ones first."""
        return (self.fwd_hooks if dir != "bwd" else []) + (self.bwd_hooks if dir != "fwd" else [])

    def __call__(self, x: Tensor) -> Tensor:  # type: ignore[override]
        # Bypasses nn.Module.__call__: the un-hooked cost is this one attribute check.
        if not self._active:
            return x
        return self._run(x)

    def forward(self, x: Tensor) -> Tensor:
        return self(x)

    @property
    def checks_finite(self) -> bool:
        return bool(self.finite_checks)

    def _run(self, x: Tensor) -> Tensor:
        frames = _SCOPES.frames
        active = frames[-1]
        for hook in tuple(self.fwd_hooks):
            if hook.scope is not None and hook.scope not in active:
                continue  # another thread's, or an outer call's, temporary hook
            frames.append([])  # a model call inside the hook sees none of this call's scopes
            try:
                out = hook.fn(x, hook=self)
            finally:
                frames.pop()
            if out is not None:
                x = _check_replacement(str(self.name), hook.fn, "forward", x, out)
        if self.finite_checks and any(scope in active for scope in tuple(self.finite_checks)):
            if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                raise NonFiniteActivationError.of(str(self.name), x)
        if self.bwd_hooks and x.requires_grad:
            bwd = tuple(hook for hook in tuple(self.bwd_hooks) if hook.scope is None or hook.scope in active)
            if bwd:
                # Attached to this forward's activation: fires on its backward even after removal.
                x.register_hook(functools.partial(self._run_bwd, bwd))
        return x

    def _run_bwd(self, hooks: tuple[_Hook, ...], grad: Tensor) -> Tensor | None:
        replaced = False
        for hook in hooks:
            out = _call_isolated(hook.fn, grad, self)
            if out is not None:
                grad = _check_replacement(str(self.name), hook.fn, "backward", grad, out)
                replaced = True
        return grad if replaced else None

    def add_hook(
        self, fn: HookFn, dir: Direction = "fwd", is_permanent: bool = False, level: int | None = None,
        prepend: bool = False, scope: _Scope | None = None,
    ) -> _Hook:
        """Attach ``fn`` (model-wide unless a ``scope`` is given); returns the attachment, which ``remove`` takes."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        if not callable(fn):
            raise TypeError(f"hook for {self.name!r} must be callable, got {type(fn).__name__}")
        hook = _Hook(fn, dir, is_permanent, level, scope)
        with _MUTATE:
            hooks = self.fwd_hooks if dir == "fwd" else self.bwd_hooks
            hooks.insert(0, hook) if prepend else hooks.append(hook)
            self._update_has_hooks()
        return hook

    def remove(self, hook: _Hook) -> None:
        with _MUTATE:
            hooks = self.fwd_hooks if hook.direction == "fwd" else self.bwd_hooks
            if hook in hooks:
                hooks.remove(hook)
            self._update_has_hooks()

    def remove_hooks(
        self, dir: Literal["fwd", "bwd", "both"] = "both", including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        def keep(hook: _Hook) -> bool:
            if not _in_scope(hook.scope):  # another thread's (or an outer call's) temporary hook: its own to remove
                return True
            return (hook.permanent and not including_permanent) or (level is not None and hook.level != level)

        with _MUTATE:
            if dir in ("fwd", "both"):
                self.fwd_hooks = [h for h in self.fwd_hooks if keep(h)]
            if dir in ("bwd", "both"):
                self.bwd_hooks = [h for h in self.bwd_hooks if keep(h)]
            self._update_has_hooks()

    def add_finite_check(self, scope: _Scope) -> None:
        with _MUTATE:
            self.finite_checks.append(scope)
            self._update_has_hooks()

    def remove_finite_check(self, scope: _Scope) -> None:
        with _MUTATE:
            if scope in self.finite_checks:
                self.finite_checks.remove(scope)
            self._update_has_hooks()

    def _update_has_hooks(self) -> None:
        self._active = bool(self.fwd_hooks or self.bwd_hooks or self.finite_checks)

    def clear_context(self) -> None:
        self.ctx.clear()

    @property
    def layer(self) -> int | None:
        """The block index in this hook's name, or None outside the blocks."""
        if self.name is None or not self.name.startswith("blocks."):
            return None
        return int(self.name.split(".")[1])

    def __repr__(self) -> str:
        parts = [repr(self.name)] if self.name is not None else []
        parts += [f"{len(hooks)} {d}" for d, hooks in (("fwd", self.fwd_hooks), ("bwd", self.bwd_hooks)) if hooks]
        return f"HookPoint({', '.join(parts)})"


def is_hooked(point: nn.Module) -> bool:
    """Whether the module at a hook site may change what passes through it: a HookPoint's ``has_hooks``;
    any other module put in its place (SAELens' SAE wrapper, say) counts as hooked, so the forward pass
    takes the path that calls it."""
    return bool(getattr(point, "has_hooks", True))


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
            if incl_bwd is True:
                if not isinstance(out, Tensor) or out.numel() != 1 or not out.requires_grad:
                    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise ValueError(
                        f"incl_bwd=True calls .backward() on the output, as TransformerLens does, so the output "
                        f"must be a scalar that requires grad (return_type='loss'); got {shape}. To backpropagate "
                        "a metric of your own, pass incl_bwd='deferred' and call .backward() on it yourself")
                out.backward()
        return out, ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)

    def cache_all(self, cache: dict[str, Tensor], names_filter: NamesFilter = None, **kwargs: Any) -> None:
        """Permanently-until-reset cache activations into ``cache`` (TransformerLens' ``cache_all``)."""
        _, fwd, bwd = self.get_caching_hooks(names_filter, cache=cache, **kwargs)
        for name, fn in fwd:
            self.add_hook(name, fn, "fwd")
        for name, fn in bwd:
            self.add_hook(name, fn, "bwd")
