"""Catching every ``scaled_dot_product_attention`` call a model makes, and naming it after its caller.

A ``torch.overrides.TorchFunctionMode`` sees each call; module forward pre/post hooks keep a stack of
the modules running, so the innermost one names the call. Both are in place only during a forward
that needs them (while recording call sites, or while a site has hooks): an unhooked forward runs
the model untouched. The k-th call one module makes during one forward (from 0) is call ``k``.
"""

import threading
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from hooked_attn.wrap.sdpa import SDPA, AttentionSite, hooked_sdpa


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


class SdpaCapture(TorchFunctionMode):
    """Routes each ``scaled_dot_product_attention`` call to its ``AttentionSite`` for one forward.

    ``site_for(path, call)`` returns (creating it if new) the site of a module's k-th call. Calls
    inside a module the tracker marks (``HookedMultiheadAttention``, which hooks itself) are left
    alone. The mode is off while torch handles a call it sees, so the SDPA call inside a direct call
    of ``F.multi_head_attention_forward`` (not through ``nn.MultiheadAttention``) is not caught.
    """

    def __init__(self, tracker: ModuleTracker, site_for: Callable[[str, int], AttentionSite]) -> None:
        super().__init__()
        self.tracker = tracker
        self.site_for = site_for
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is SDPA:
            path, hooks_itself = self.tracker.current()
            if not hooks_itself:
                call = self.calls.get(path, 0)
                self.calls[path] = call + 1
                return hooked_sdpa(self.site_for(path, call), args, kwargs)
        return func(*args, **kwargs)
