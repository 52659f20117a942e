"""HookPoint, the identity module at every named activation, with what it needs: the record of one
attached hook, the scopes temporary hooks belong to, and the errors a hook point raises.
``hooked_attn.hook_points`` (the public import path) re-exports all of it beside HookedRootModule.

A HookPoint costs one attribute check per call when nothing is attached. Hook functions take
``(activation, hook)`` and may return a replacement tensor of the same shape, dtype and device.

Temporary hooks (``hooks()``, ``run_with_hooks``, ``run_with_cache``, ``check_finite``) belong to a
*scope*: they fire only in the thread that attached them, and not in a model call made from inside a
hook function (which sees only model-wide hooks and the ones it attaches itself). So two threads can
use one model at once, and a hook may call the model without disturbing the outer call. Hooks added
with ``add_hook`` are model-wide: they fire in every thread and every call.
"""

import contextlib
import functools
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import TypeCheckError
from torch import Tensor, nn

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
        # One list per run in progress in this thread (``_remove_added_on_error``): the hooks
        # attached while it runs, by hook functions or otherwise, removed if the run raises.
        self.recorders: list[list[tuple["HookPoint", "_Hook"]]] = []


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


@contextlib.contextmanager
def _remove_added_on_error() -> Iterator[None]:
    """Record the hooks this thread attaches during the body; if the body raises, remove them all
    (a hook that calls ``add_hook`` and then fails leaves nothing behind). On success they stay."""
    added: list[tuple[HookPoint, _Hook]] = []
    _SCOPES.recorders.append(added)
    try:
        yield
    except BaseException:
        for point, hook in added:
            point.remove(hook)
        raise
    finally:
        _SCOPES.recorders.pop()  # ours: runs nest, so it is the last one
    if _SCOPES.recorders:  # an enclosing run owns them too: it removes them if it fails
        _SCOPES.recorders[-1].extend(added)


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
        if _SCOPES.recorders:
            _SCOPES.recorders[-1].append((self, hook))
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

        if dir not in ("fwd", "bwd", "both"):  # "forward" removed nothing, silently
            raise HookDirectionError(f"dir must be 'fwd', 'bwd' or 'both', got {dir!r}")
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
