"""Catching every ``scaled_dot_product_attention`` call a model makes, and naming it after its caller.

A ``torch.overrides.TorchFunctionMode`` sees each call; module forward pre/post hooks keep a stack of
the modules running, so the innermost one names the call. Both are in place only during a forward
that needs them (while recording call sites, or while a site has hooks): an unhooked forward runs
the model untouched. The k-th call one module makes during one forward (from 0) is call ``k``.
"""

import inspect
import threading
import types
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from hooked_attn.hook_points import is_hooked
from hooked_attn.wrap.sdpa import SDPA, AttentionSite, Weights, hooked_sdpa


class _Stack(threading.local):
    def __init__(self) -> None:
        self.paths: list[str] = []
        self.outer: list[list[str]] = []  # the stacks of forwards this one runs inside (a hook calling the model)


class ModuleTracker:
    """Forward pre/post hooks on every module of a model, while at least one forward holds them.

    ``current()`` is the path of the innermost running module in this thread. Registration is
    counted, so concurrent forwards share one set of hooks and the last one out removes them.
    """

    def __init__(self, paths: dict[nn.Module, str], skip: tuple[type, ...]) -> None:
        self._paths = paths
        self._skip = skip
        self._stack = _Stack()
        self._lock = threading.Lock()
        self._users = 0
        self._handles: list[RemovableHandle] = []
        self.on_enter: Callable[[nn.Module, str], None] | None = None

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy / pickle: no lock, no live hooks
        state = self.__dict__.copy()
        for name in ("_lock", "_stack", "_handles"):
            del state[name]
        state["_users"] = 0
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._stack, self._handles = threading.Lock(), _Stack(), []

    def current(self) -> tuple[str, bool]:
        """(innermost module path, whether that module is one whose own attention hooks are in charge)."""
        paths = self._stack.paths
        if not paths:
            return "", False
        top = paths[-1]
        return top, top.startswith("\0")

    def _pre(self, module: nn.Module, args: Any) -> None:
        path = self._paths.get(module, "")
        if isinstance(module, self._skip):
            path = "\0" + path
        self._stack.paths.append(path)
        if self.on_enter is not None:
            self.on_enter(module, path)

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack.paths:
            self._stack.paths.pop()

    def __enter__(self) -> "ModuleTracker":
        with self._lock:
            if self._users == 0:
                for module in self._paths:
                    self._handles.append(module.register_forward_pre_hook(self._pre))
                    self._handles.append(module.register_forward_hook(self._post, always_call=True))
            self._users += 1
        self._stack.outer.append(self._stack.paths)
        self._stack.paths = []
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.paths = self._stack.outer.pop() if self._stack.outer else []
        with self._lock:
            self._users -= 1
            if self._users == 0:
                for handle in self._handles:
                    handle.remove()
                self._handles.clear()


_MHA_FORWARD = F.multi_head_attention_forward
_MHA_SIGNATURE = inspect.signature(_MHA_FORWARD)
_mha_forward_seen: Callable[..., Any] | None = None


def _mha_forward_under_mode() -> Callable[..., Any]:
    """torch's own ``F.multi_head_attention_forward``, with its torch-function check answered False.

    A ``TorchFunctionMode`` is popped while it handles a call, so the calls torch's Python function
    makes inside (its SDPA call among them) would pass unseen; calling the function again with the
    mode pushed back re-enters the mode at the function's first line, forever. This copy shares the
    original's code object, defaults and module namespace, except that ``has_torch_function`` is
    False in it: it runs the original's body, whose inner calls the pushed-back mode then sees.
    Nothing in torch is changed.
    """
    global _mha_forward_seen
    if _mha_forward_seen is None:
        namespace = dict(_MHA_FORWARD.__globals__)
        namespace["has_torch_function"] = lambda *_: False
        seen = types.FunctionType(_MHA_FORWARD.__code__, namespace, _MHA_FORWARD.__name__,
                                  _MHA_FORWARD.__defaults__, _MHA_FORWARD.__closure__)
        seen.__kwdefaults__ = _MHA_FORWARD.__kwdefaults__
        _mha_forward_seen = seen
    return _mha_forward_seen


class SdpaCapture(TorchFunctionMode):
    """Routes each ``scaled_dot_product_attention`` call to its ``AttentionSite`` for one forward.

    ``site_for(path, call)`` returns (creating it if new) the site of a module's k-th call. Calls
    inside a module the tracker marks (``HookedMultiheadAttention``, which hooks itself) are left
    alone. A direct call of ``F.multi_head_attention_forward`` runs torch's own body with this mode
    in place, so its SDPA call is caught like any other and named after the calling module; see
    ``_mha_forward`` for ``need_weights=True``.
    """

    def __init__(self, tracker: ModuleTracker, site_for: Callable[[str, int], AttentionSite]) -> None:
        super().__init__()
        self.tracker = tracker
        self.site_for = site_for
        self.calls: dict[str, int] = {}
        # The site (and the weights to report) for the SDPA call of the multi_head_attention_forward body now running.
        self.pending: tuple[AttentionSite, Weights] | None = None

    def _next_site(self) -> AttentionSite:
        path, _ = self.tracker.current()
        call = self.calls.get(path, 0)
        self.calls[path] = call + 1
        return self.site_for(path, call)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is SDPA:
            if self.pending is not None:
                (site, weights), self.pending = self.pending, None
                return hooked_sdpa(site, args, kwargs, weights)
            if not self.tracker.current()[1]:
                return hooked_sdpa(self._next_site(), args, kwargs)
        elif func is _MHA_FORWARD and not self.tracker.current()[1]:
            return self._mha_forward(args, kwargs)
        return func(*args, **kwargs)

    def _mha_forward(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """A direct ``F.multi_head_attention_forward`` call, hooked at its SDPA call.

        ``need_weights=False``: torch's body runs as it is, its SDPA call caught. ``need_weights=True``
        (torch's default) computes the weights by hand, without SDPA; when that call's site has hooks,
        torch's body runs with ``need_weights=False`` instead (and without the ``is_causal`` hint,
        which torch's weights path ignores too), the SDPA site computing the pattern beside. When no
        hook changed anything, the result is then torch's own weights path, run afresh: output and
        weights bit for bit as unwrapped. Otherwise the output follows the edits and the returned
        weights are the (edited, dropped-out) pattern, averaged over heads if asked.
        """
        bound = _MHA_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        if not call["need_weights"]:
            with self:
                return _mha_forward_under_mode()(*args, **kwargs)
        site = self._next_site()
        if not any(is_hooked(p) for p in site.points().values()):
            return _MHA_FORWARD(*args, **kwargs)
        weights = Weights()
        self.pending = (site, weights)
        try:
            with self:
                out, _ = _mha_forward_under_mode()(**(call | {
                    "need_weights": False, "is_causal": call["is_causal"] and call["attn_mask"] is None}))
        finally:
            self.pending = None
        if not weights.replaced:
            return _MHA_FORWARD(*args, **kwargs)
        assert weights.pattern is not None
        pattern = weights.pattern.mean(dim=1) if call["average_attn_weights"] else weights.pattern
        return out, pattern if call["query"].ndim == 3 else pattern[0]
