"""Hooks never leak: thousands of randomly interleaved hook operations on two models, each beside a
shadow of the hook state it should have, checked after every operation (and, through probe hooks,
during the forward passes too)."""

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from conftest import random_tokens, tiny_hf_model

from hooked_attn import HookedTransformer, NonFiniteActivationError
from hooked_attn.architectures.gpt2 import tiny_hf_configs as gpt2_configs

N_OPS = 1500  # top-level operations; hooks() contexts add nested ones
MAX_DEPTH = 2  # hooks() contexts nest this deep


class Abort(BaseException):
    """Like KeyboardInterrupt: not an Exception, so only `finally` clauses see it."""


class Recorder:
    """A hook function that counts its calls (identity equality: each instance is one function)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, hook) -> None:
        self.calls += 1


class Raiser:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __call__(self, x: torch.Tensor, hook) -> None:
        raise self.error


@dataclass(frozen=True)
class Entry:
    fn: Callable
    permanent: bool = False
    level: int | None = None


@dataclass
class Shadow:
    """The hook state a model should have: hook name -> direction -> attachments in order."""

    names: list[str]
    state: dict[str, dict[str, list[Entry]]] = field(default_factory=dict)

    def add(self, name: str, entry: Entry, direction: str = "fwd", prepend: bool = False) -> None:
        hooks = self.state.setdefault(name, {"fwd": [], "bwd": []})[direction]
        hooks.insert(0, entry) if prepend else hooks.append(entry)

    def remove(self, name: str, fn: Callable, direction: str) -> None:
        hooks = self.state.get(name, {}).get(direction, [])
        for entry in hooks:
            if entry.fn is fn:
                hooks.remove(entry)
                return

    def reset(self, including_permanent: bool, direction: str, level: int | None) -> None:
        for per_point in self.state.values():
            for d in ("fwd", "bwd"):
                if direction in (d, "both"):
                    per_point[d] = [e for e in per_point[d]
                                    if (e.permanent and not including_permanent) or (level is not None and e.level != level)]

    def expected(self) -> dict[str, tuple[tuple, tuple]]:
        return {name: (tuple((e.fn, e.permanent, e.level) for e in d["fwd"]),
                       tuple((e.fn, e.permanent, e.level) for e in d["bwd"]))
                for name, d in self.state.items() if d["fwd"] or d["bwd"]}

    def attached(self, direction: str, skip: tuple[str, ...] = ()) -> list[Callable]:
        return [e.fn for name, d in self.state.items() if not name.endswith(skip) for e in d[direction]]


def real_state(model: HookedTransformer) -> dict[str, tuple[tuple, tuple]]:
    out = {}
    for name, point in model.hook_dict.items():
        assert point.has_hooks == bool(point.fwd_hooks or point.bwd_hooks), name
        assert not point.checks_finite, name
        if point.fwd_hooks or point.bwd_hooks:
            out[name] = (tuple((h.fn, h.permanent, h.level) for h in point.fwd_hooks),
                         tuple((h.fn, h.permanent, h.level) for h in point.bwd_hooks))
    return out


class Stress:
    """Random operations on one model and its shadow."""

    def __init__(self, model: HookedTransformer, tokens: torch.Tensor, rng: random.Random) -> None:
        self.model, self.tokens, self.rng = model, tokens, rng
        self.shadow = Shadow(list(model.hook_dict))
        self.counts: dict[str, int] = {}

    def check(self) -> None:
        assert real_state(self.model) == self.shadow.expected()

    def name(self) -> str | Callable[[str], bool]:
        if self.rng.random() < 0.15:
            suffix = self.rng.choice(["hook_resid_pre", "hook_pattern", "hook_z", "hook_embed"])
            return lambda n: n.endswith(suffix)
        return self.rng.choice(self.shadow.names)

    def expand(self, name: str | Callable[[str], bool]) -> list[str]:
        return [n for n in self.shadow.names if name(n)] if callable(name) else [name]

    def probe(self, direction_entries: list[tuple[str | Callable, Callable, str]]) -> Callable:
        """A hook that checks, while the forward runs, that the live state is the shadow plus these temps."""
        expected = Shadow(self.shadow.names, {n: {d: list(v) for d, v in per.items()}
                                              for n, per in self.shadow.state.items()})
        checked = []

        def probe(x: torch.Tensor, hook) -> None:
            if not checked:
                checked.append(True)
                assert real_state(self.model) == expected.expected(), "hook state during the forward"

        for name, fn, d in [*direction_entries, ("hook_embed", probe, "fwd")]:
            for n in self.expand(name):
                expected.add(n, Entry(fn), d)
        return probe

    def temps(self, n_max: int = 3) -> list[tuple[str | Callable, Callable, str]]:
        return [(self.name(), Recorder(), self.rng.choice(["fwd", "fwd", "bwd"])) for _ in range(self.rng.randint(0, n_max))]

    def split(self, temps):
        fwd = [(n, fn) for n, fn, d in temps if d == "fwd"]
        bwd = [(n, fn) for n, fn, d in temps if d == "bwd"]
        return fwd, bwd

    def raising(self) -> Raiser:
        return Raiser(self.rng.choice([RuntimeError("boom"), KeyboardInterrupt(), Abort(), ValueError("bad")]))

    # -- operations -------------------------------------------------------------------------
    def op_add(self, depth: int) -> None:
        name, fn, direction = self.name(), Recorder(), self.rng.choice(["fwd", "bwd"])
        level, prepend = self.rng.choice([None, None, 1, 2]), self.rng.random() < 0.3
        self.model.add_hook(name, fn, dir=direction, level=level, prepend=prepend)
        for n in self.expand(name):
            self.shadow.add(n, Entry(fn, level=level), direction, prepend)

    def op_add_perma(self, depth: int) -> None:
        name, fn, direction = self.name(), Recorder(), self.rng.choice(["fwd", "bwd"])
        self.model.add_perma_hook(name, fn, dir=direction)
        for n in self.expand(name):
            self.shadow.add(n, Entry(fn, permanent=True), direction)

    def op_reset(self, depth: int) -> None:
        including = self.rng.random() < 0.3
        direction = self.rng.choice(["fwd", "bwd", "both", "both"])
        level = self.rng.choice([None, None, None, 1, 2])
        self.model.reset_hooks(including_permanent=including, direction=direction, level=level)
        self.shadow.reset(including, direction, level)

    def op_forward(self, depth: int) -> None:
        """A plain forward: every attached forward hook fires once per attachment."""
        fns = self.shadow.attached("fwd")
        before = {fn: fn.calls for fn in fns if isinstance(fn, Recorder)}  # probes kept by reset_hooks_end=False
        with torch.no_grad():
            self.model(self.tokens)
        for fn, calls in before.items():
            assert fn.calls - calls == fns.count(fn)

    def op_run_with_hooks(self, depth: int) -> None:
        temps = self.temps()
        keep = self.rng.random() < 0.1  # reset_hooks_end=False: the temporary hooks stay
        probe = self.probe(temps)
        fwd, bwd = self.split(temps)
        with torch.no_grad():
            self.model.run_with_hooks(self.tokens, fwd_hooks=[*fwd, ("hook_embed", probe)], bwd_hooks=bwd,
                                      reset_hooks_end=not keep)
        if keep:
            for name, fn, d in [*temps, ("hook_embed", probe, "fwd")]:
                for n in self.expand(name):
                    self.shadow.add(n, Entry(fn), d)

    def op_run_with_hooks_raising(self, depth: int) -> None:
        fwd, bwd = self.split(self.temps())
        bad = self.raising()
        with pytest.raises(type(bad.error)):
            self.model.run_with_hooks(self.tokens, fwd_hooks=[*fwd, (self.name(), bad)], bwd_hooks=bwd)

    def op_run_with_cache(self, depth: int) -> None:
        names = self.rng.choice([None, self.rng.choice(self.shadow.names), lambda n: "attn" in n,
                                 self.rng.sample(self.shadow.names, 3)])
        with torch.no_grad():
            _, cache = self.model.run_with_cache(self.tokens, names_filter=names)
        assert len(cache) > 0

    def op_backward(self, depth: int) -> None:
        """Backward hooks attached for one forward fire on its backward, after they were removed."""
        temps = [(name, Recorder()) for name, _, _ in self.temps()]
        # The norms compute with their own 1/scale and pass hook_scale's output on only when a hook
        # edited it, so no gradient reaches hook_scale and its backward hooks never fire.
        skip = ("hook_scale",)
        attachments = self.shadow.attached("bwd", skip) + [
            fn for name, fn in temps for n in self.expand(name) if not n.endswith(skip)]
        logits = self.model.run_with_hooks(self.tokens, bwd_hooks=temps)
        self.check()  # the temporary backward hooks are gone before the backward runs
        before = {fn: fn.calls for fn in attachments}
        logits[:, -1].logsumexp(-1).sum().backward()
        self.model.zero_grad(set_to_none=True)
        for fn, calls in before.items():
            assert fn.calls - calls == attachments.count(fn)

    def op_bad_input(self, depth: int) -> None:
        choice = self.rng.randrange(3)
        if choice == 0:
            with pytest.raises(KeyError, match="unknown hook name"):
                self.model.add_hook("blocks.0.hook_resid_prey", Recorder())
        elif choice == 1:
            bad_list = [(self.name(), Recorder()), ("no_such_hook", Recorder())]
            with pytest.raises(KeyError), self.model.hooks(fwd_hooks=bad_list):
                raise AssertionError("never entered")
        else:
            with pytest.raises(ValueError, match="shape"):
                self.model.run_with_hooks(self.tokens, fwd_hooks=[(self.rng.choice(self.shadow.names),
                                                                    lambda x, hook: x[:, :-1].clone())])

    def op_check_finite(self, depth: int) -> None:
        def poison(x: torch.Tensor, hook) -> torch.Tensor:
            return x.clone().fill_(float("nan"))

        poisoned = self.rng.choice([n for n in self.shadow.names if not n.endswith("hook_result")])
        with torch.no_grad(), pytest.raises(NonFiniteActivationError, match="NaN"), self.model.check_finite():
            self.model.run_with_hooks(self.tokens, fwd_hooks=[(poisoned, poison)])

    def op_generate(self, depth: int) -> None:
        fwd, _ = self.split(self.temps())
        raise_it = self.rng.random() < 0.3
        hooks = fwd + ([(self.name(), self.raising())] if raise_it else [])
        try:
            with self.model.hooks(fwd_hooks=hooks):
                self.model.generate(self.tokens[:, :4], max_new_tokens=2, stop_at_eos=False,
                                    use_past_kv_cache=self.rng.random() < 0.5)
        except (RuntimeError, KeyboardInterrupt, Abort, ValueError):
            assert raise_it
        else:
            assert not raise_it

    def op_context(self, depth: int) -> None:
        """hooks() around nested random operations; the body returns or raises."""
        if depth >= MAX_DEPTH:
            return self.op_add(depth)
        temps = self.temps()
        fwd, bwd = self.split(temps)
        keep = self.rng.random() < 0.1
        body_raises = self.rng.choice([None, None, RuntimeError, Abort])
        try:
            with self.model.hooks(fwd_hooks=fwd, bwd_hooks=bwd, reset_hooks_end=not keep):
                for name, fn, d in temps:
                    for n in self.expand(name):
                        self.shadow.add(n, Entry(fn), d)
                self.check()
                for _ in range(self.rng.randint(0, 4)):
                    self.step(depth + 1)
                if body_raises is not None:
                    raise body_raises("from the body")
        except (RuntimeError, Abort) as err:
            assert body_raises is not None and isinstance(err, body_raises)
        if not keep:
            for name, fn, d in temps:
                for n in self.expand(name):
                    self.shadow.remove(n, fn, d)

    OPS: ClassVar[dict[str, int]] = {  # operation -> weight
        "op_add": 6, "op_add_perma": 2, "op_reset": 3, "op_forward": 2, "op_run_with_hooks": 4,
        "op_run_with_hooks_raising": 3, "op_run_with_cache": 2, "op_backward": 1, "op_bad_input": 1,
        "op_check_finite": 1, "op_generate": 1, "op_context": 3,
    }

    def step(self, depth: int = 0) -> None:
        op = self.rng.choices(list(self.OPS), weights=list(self.OPS.values()))[0]
        self.counts[op] = self.counts.get(op, 0) + 1
        getattr(self, op)(depth)
        self.check()


@pytest.fixture(scope="module")
def two_models():
    cfg = gpt2_configs()["default"]
    hf = tiny_hf_model(cfg)
    return (HookedTransformer.from_pretrained_no_processing(hf), HookedTransformer.from_pretrained_no_processing(hf),
            random_tokens(cfg, batch=2, n_pos=6))


@pytest.mark.parametrize("seed", [0])
def test_random_hook_operations_never_leak(two_models, seed):
    model_a, model_b, tokens = two_models
    model_a.reset_hooks(including_permanent=True)
    model_b.reset_hooks(including_permanent=True)
    rng = random.Random(seed)
    stresses = [Stress(model_a, tokens, rng), Stress(model_b, tokens, rng)]
    clean = model_a(tokens).detach()
    for _ in range(N_OPS):
        stress = rng.choice(stresses)
        stress.step()
        for other in stresses:  # the other model never sees this one's hooks
            other.check()
    counts = {op: sum(s.counts.get(op, 0) for s in stresses) for op in Stress.OPS}
    assert all(n > 0 for n in counts.values()) and sum(counts.values()) > N_OPS, counts
    for model in (model_a, model_b):
        model.reset_hooks(including_permanent=True)
        assert model.n_hooks() == 0
        torch.testing.assert_close(model(tokens), clean)  # nothing left behind changes the output


def test_the_same_function_on_two_models_is_two_attachments(two_models):
    model_a, model_b, tokens = two_models
    fn = Recorder()
    model_a.add_hook("hook_embed", fn)
    model_b.add_perma_hook("hook_embed", fn)
    model_a.reset_hooks()
    assert model_a.n_hooks() == 0 and model_b.n_hooks() == 1
    model_b(tokens)
    assert fn.calls == 1
    model_b.reset_hooks(including_permanent=True)
