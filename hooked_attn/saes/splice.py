"""Splicing SAEs and transcoders into a HookedTransformer: ``add_sae``, ``reset_saes``, the ``saes``
context manager and ``run_*_with_saes``, as a mixin of the model class.

While spliced, the model's HookPoint at the SAE's hook is swapped for an ``SAESite`` (a HookPoint
that keeps the point's name, hooks and context). The hooks attached there run first and see the
activation entering the SAE; then the SAE's output replaces it. The SAE's own hook points join the
model's ``hook_dict`` as ``<hook>.hook_sae_input``, ``.hook_sae_acts_pre``, ``.hook_sae_acts_post``,
``.hook_sae_recons``, ``.hook_sae_error`` and ``.hook_sae_output`` (a transcoder's under its output
hook), so caching, hooks and patching reach them by name.
"""

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from hooked_attn.hook_points import HookPoint
from hooked_attn.saes.sae import SAE


@dataclass(eq=False)
class _Splice:
    """One SAE in place: where it reads and writes, and a transcoder's captured input."""

    sae: SAE
    use_error_term: bool
    hook_in: str
    hook_out: str
    captured: Tensor | None = None

    def apply(self, x: Tensor) -> Tensor:
        cfg = self.sae.cfg
        inp, self.captured = (self.captured, None) if cfg.is_transcoder else (x, None)
        if inp is None:
            raise RuntimeError(f"transcoder {self.hook_in!r} -> {self.hook_out!r}: its input hook did not run "
                               "before its output hook in this forward (a start_at_layer past its input?)")
        in_head = cfg.hook_head_index
        out_head = cfg.hook_head_index_out if cfg.is_transcoder else cfg.hook_head_index
        for head, act, name in ((in_head, inp, self.hook_in), (out_head, x, self.hook_out)):
            if head is not None and (act.ndim < 2 or not -act.shape[-2] <= head < act.shape[-2]):
                raise ValueError(f"{self.sae!r}: head index {head} does not fit {name!r}, whose activation has "
                                 f"shape {tuple(act.shape)} (heads on the second-to-last axis)")
        if in_head is not None:
            inp = inp[..., in_head, :]
        target = x[..., out_head, :] if out_head is not None else x
        # The SAE may live on another device than the model (docs/scale.md): it reads there, writes back here.
        here = self.sae.device
        out = self.sae(inp.to(here), use_error_term=self.use_error_term, target=target.to(here))
        if out.shape != target.shape:
            raise ValueError(f"SAE at {self.hook_out!r} returned shape {tuple(out.shape)}, but the activation it "
                             f"replaces has shape {tuple(target.shape)}")
        out = out.to(x.device, x.dtype)
        if out_head is None:
            return out
        x = x.clone()
        x[..., out_head, :] = out
        return x


class SAESite(HookPoint):
    """A model HookPoint while an SAE reads (transcoder input) or writes at it."""

    def __init__(self, original: HookPoint) -> None:
        super().__init__(opt_in=original.opt_in)
        self.name = original.name
        # The same list and dict objects: hooks attached or removed through either object stay in step.
        self.fwd_hooks, self.bwd_hooks, self.ctx = original.fwd_hooks, original.bwd_hooks, original.ctx
        self.finite_checks = original.finite_checks  # shared, like the hook lists
        self.__dict__["original"] = original  # not a submodule: the model's modules stay as they were
        self.writer: _Splice | None = None
        self.readers: list[_Splice] = []
        self.has_hooks = True

    def _update_has_hooks(self) -> None:
        self.has_hooks = True

    def _run(self, x: Tensor) -> Tensor:
        x = super()._run(x)
        for splice in self.readers:
            splice.captured = x
        if self.writer is not None:
            x = self.writer.apply(x)
        return x

    def restore(self) -> HookPoint:
        original: HookPoint = self.__dict__["original"]
        original.fwd_hooks, original.bwd_hooks, original.ctx = self.fwd_hooks, self.bwd_hooks, self.ctx
        original.finite_checks = self.finite_checks
        original._update_has_hooks()
        return original

    def __repr__(self) -> str:
        sae = f", sae={self.writer.sae!r}" if self.writer is not None else ""
        return f"SAESite({self.name!r}, fwd_hooks={len(self.fwd_hooks)}{sae})"


class SAESplicingMixin:
    """``add_sae`` / ``reset_saes`` / ``saes`` / ``run_with_saes`` and friends for a HookedRootModule."""

    hook_dict: dict[str, HookPoint]
    mod_dict: dict[str, nn.Module]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A transcoder's captured input belongs to one model call: each call starts without one and
        # gives back the enclosing call's when it ends. Otherwise a stop_at_layer run that captured
        # an input but never reached the output left it for a later start_at_layer run to use (a
        # silent wrong output), and a model call made inside a hook replaced the outer call's.
        splices = [s for s in self.__dict__.get("_sae_splices", {}).values() if s.sae.cfg.is_transcoder]
        if not splices:
            return super().__call__(*args, **kwargs)  # type: ignore[misc]
        saved = [s.captured for s in splices]
        for splice in splices:
            splice.captured = None
        try:
            return super().__call__(*args, **kwargs)  # type: ignore[misc]
        finally:
            for splice, captured in zip(splices, saved):
                splice.captured = captured

    @property
    def _splices(self) -> dict[str, _Splice]:
        return self.__dict__.setdefault("_sae_splices", {})

    @property
    def acts_to_saes(self) -> dict[str, SAE]:
        """The spliced SAEs, keyed by the hook each reads."""
        return {name: s.sae for name, s in self._splices.items()}

    def _check_sae(self, sae: SAE) -> tuple[str, str]:
        if not isinstance(sae, SAE):
            raise TypeError(f"expected a hooked_attn SAE, got {type(sae).__name__}")
        cfg = sae.cfg
        if cfg.hook_name is None:
            raise ValueError(f"{sae!r} has no hook_name (cfg metadata), so it cannot be spliced")
        hook_out = cfg.hook_name_out if cfg.is_transcoder else cfg.hook_name
        if hook_out is None:
            raise ValueError(f"transcoder {sae!r} has no hook_name_out (cfg metadata), so it cannot be spliced")
        for name in (cfg.hook_name, hook_out):
            if name not in self.hook_dict:
                self._raise_unknown_hook(name)  # type: ignore[attr-defined]
            if name not in self.mod_dict:  # in hook_dict only: a spliced SAE's own hook point
                raise ValueError(f"{sae!r}: {name!r} is a spliced SAE's own hook point; SAEs splice at the model's")
        for hook_in, splice in self._splices.items():
            if splice.sae is sae and hook_in != cfg.hook_name:
                raise ValueError(f"{sae!r} is already spliced at {hook_in!r}")
            if hook_in != cfg.hook_name and splice.hook_out == hook_out:
                raise ValueError(f"{hook_out!r} is already written by the SAE spliced at {hook_in!r}; "
                                 "reset it first")
        return cfg.hook_name, hook_out

    def add_sae(self, sae: SAE, use_error_term: bool | None = None) -> None:
        """Splice ``sae`` at its ``hook_name`` (a transcoder from ``hook_name`` to ``hook_name_out``)
        until ``reset_saes``; an SAE already spliced at that hook is replaced.

        Args:
            use_error_term: add the SAE's error back, so the model's output is unchanged while the
                features are computed (and hookable). None takes ``sae.use_error_term``.
        """
        hook_in, hook_out = self._check_sae(sae)
        if hook_in in self._splices:
            self._remove_splice(hook_in)
        splice = _Splice(sae, sae.use_error_term if use_error_term is None else use_error_term, hook_in, hook_out)
        self._site(hook_out).writer = splice
        if sae.cfg.is_transcoder:
            self._site(hook_in).readers.append(splice)
        for local, point in sae.hook_dict.items():
            point.name = f"{hook_out}.{local}"
            self.hook_dict[point.name] = point
        self._splices[hook_in] = splice

    def reset_saes(self, act_names: str | Sequence[str] | None = None) -> None:
        """Remove the SAEs spliced at these hooks (input hook names; None removes all)."""
        names = list(self._splices) if act_names is None else [act_names] if isinstance(act_names, str) else list(act_names)
        missing = [n for n in names if n not in self._splices]
        if missing:
            raise KeyError(f"no SAE is spliced at {missing}; spliced: {list(self._splices)}")
        for name in names:
            self._remove_splice(name)

    def _site(self, name: str) -> SAESite:
        point = self.hook_dict[name]
        if isinstance(point, SAESite):
            return point
        site = SAESite(point)
        self._swap(name, site)
        return site

    def _swap(self, name: str, new: HookPoint) -> None:
        parent_name, _, attr = name.rpartition(".")
        parent = self.get_submodule(parent_name) if parent_name else self  # type: ignore[attr-defined]
        setattr(parent, attr, new)
        self.hook_dict[name] = new
        self.mod_dict[name] = new

    def _remove_splice(self, hook_in: str) -> None:
        splice = self._splices.pop(hook_in)
        for local, point in splice.sae.hook_dict.items():
            self.hook_dict.pop(point.name, None)  # type: ignore[arg-type]
            point.name = local
        splice.captured = None
        for name in {splice.hook_in, splice.hook_out}:
            site = self.hook_dict[name]
            assert isinstance(site, SAESite), name
            if site.writer is splice:
                site.writer = None
            site.readers = [r for r in site.readers if r is not splice]
            if site.writer is None and not site.readers:
                self._swap(name, site.restore())

    @contextlib.contextmanager
    def saes(self, saes: SAE | Sequence[SAE] = (), reset_saes_end: bool = True,
             use_error_term: bool | None = None) -> Iterator[Any]:
        """Splice ``saes`` for the body of a ``with`` block. On exit (also on errors) they are removed
        and any SAE they displaced is put back, unless ``reset_saes_end=False``."""
        saes = [saes] if isinstance(saes, SAE) else list(saes)
        for sae in saes:
            self._check_sae(sae)
        displaced = {s.cfg.hook_name: self._splices.get(s.cfg.hook_name) for s in saes}  # type: ignore[index]
        try:
            for sae in saes:
                self.add_sae(sae, use_error_term=use_error_term)
            yield self
        finally:
            if reset_saes_end:
                for hook_in, previous in displaced.items():
                    if hook_in in self._splices:
                        self._remove_splice(hook_in)  # type: ignore[arg-type]
                    if previous is not None:
                        self.add_sae(previous.sae, use_error_term=previous.use_error_term)

    def run_with_saes(self, *model_args: Any, saes: SAE | Sequence[SAE] = (), reset_saes_end: bool = True,
                      use_error_term: bool | None = None, **model_kwargs: Any) -> Any:
        """Run the model with ``saes`` spliced for this forward."""
        with self.saes(saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self(*model_args, **model_kwargs)  # type: ignore[operator]

    def run_with_cache_with_saes(self, *model_args: Any, saes: SAE | Sequence[SAE] = (), reset_saes_end: bool = True,
                                 use_error_term: bool | None = None, **kwargs: Any) -> Any:
        """``run_with_cache`` with ``saes`` spliced; their features are cached under ``<hook>.hook_sae_*``."""
        with self.saes(saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self.run_with_cache(*model_args, **kwargs)  # type: ignore[attr-defined]

    def run_with_hooks_with_saes(self, *model_args: Any, saes: SAE | Sequence[SAE] = (), reset_saes_end: bool = True,
                                 use_error_term: bool | None = None, **kwargs: Any) -> Any:
        """``run_with_hooks`` with ``saes`` spliced; hooks may name the SAEs' own hook points."""
        with self.saes(saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self.run_with_hooks(*model_args, **kwargs)  # type: ignore[attr-defined]
