"""WeightsMixin: HookedTransformer's weight views (``W_Q``... stacked over layers, ``W_E``, ``W_U``, ``W_pos``,
the ``QK``/``OV`` circuits), each named in the error when a model lacks it.

On a model spread by a device map (hooked_attn.scale), a unit kept on disk has its parameters on ``meta``
outside a forward; these views read such a unit's weights from the offload folder instead
(``weights_loaded``, exported by hooked_attn.scale), so they equal the plain-loaded model's.
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from hooked_attn.config import LearnedPositions, ShortformerPositions

if TYPE_CHECKING:
    from hooked_attn.components.block import TransformerBlock
    from hooked_attn.factored_matrix import FactoredMatrix

_ABSENT_WEIGHTS = {
    "W_pos": "this model has no learned position embedding: it has {positions}",
    "W_gate": "this model's MLP is not gated, so it has no W_gate",
    "b_gate": "this model's MLP is not gated, so it has no b_gate",
}


@contextlib.contextmanager
def weights_loaded(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the parameters of ``module`` and its submodules that a device map keeps off their
    compute device (a "disk" unit, on ``meta`` outside a forward) are real: read from the offload folder
    as for a forward, on the device the unit computes on. After it they are ``meta`` again; a tensor
    taken inside is a copy (writing to it changes nothing on disk). Elsewhere the module is left as is::

        with weights_loaded(model.blocks[2]):
            W_Q = model.blocks[2].attn.W_Q.clone()

    Exported as ``hooked_attn.scale.weights_loaded``; ``model.W_Q`` and the other views below do this themselves.
    """
    if not any(hasattr(sub, "_hf_hook") for sub in module.modules()):  # not dispatched: accelerate not imported
        yield module
        return
    from accelerate.utils import align_module_device, has_offloaded_params

    with contextlib.ExitStack() as stack:
        for sub in module.modules():
            if has_offloaded_params(sub):
                stack.enter_context(align_module_device(sub))
        yield module


def _stacked(name: str, get: Callable[["TransformerBlock"], Tensor]) -> property:
    return property(lambda self: self._stack(name, get), doc=f"``{name}`` of every block, stacked over ``layer``.")


class WeightsMixin:
    """Weight views for HookedTransformer; the per-head layout is in docs/conventions.md."""

    cfg: Any
    blocks: nn.ModuleList

    def _read(self, name: str, modules: list[nn.Module], get: Callable[[], Tensor]) -> Tensor:
        with contextlib.ExitStack() as stack:
            for module in modules if hasattr(self, "hf_device_map") else ():  # only a dispatched model offloads
                stack.enter_context(weights_loaded(module))
            value = get()
        if value.is_meta:  # e.g. a model built on meta and never given weights
            raise ValueError(f"{name}: the model's weights are on the meta device (not loaded), so {name} has no "
                             "values; load the model with from_pretrained")
        return value

    def _stack(self, name: str, get: Callable[["TransformerBlock"], Tensor]) -> Tensor:
        blocks = list(self.blocks)
        return self._read(name, blocks, lambda: torch.stack([get(block) for block in blocks]))  # type: ignore[arg-type]

    # Weights stacked over layers, in the per-head layout (see docs/conventions.md).
    W_Q = _stacked("W_Q", lambda b: b.attn.W_Q)
    W_K = _stacked("W_K", lambda b: b.attn.W_K)
    W_V = _stacked("W_V", lambda b: b.attn.W_V)
    W_O = _stacked("W_O", lambda b: b.attn.W_O)
    b_Q = _stacked("b_Q", lambda b: b.attn.b_Q)
    b_K = _stacked("b_K", lambda b: b.attn.b_K)
    b_V = _stacked("b_V", lambda b: b.attn.b_V)
    b_O = _stacked("b_O", lambda b: b.attn.b_O)
    W_in = _stacked("W_in", lambda b: b.mlp.W_in)
    W_out = _stacked("W_out", lambda b: b.mlp.W_out)
    b_in = _stacked("b_in", lambda b: b.mlp.b_in)
    b_out = _stacked("b_out", lambda b: b.mlp.b_out)
    # A unit on disk gives a copy read from the folder; elsewhere these are the parameters themselves.
    W_E = property(lambda self: self._read("W_E", [self.embed], lambda: self.embed.W_E))
    W_U = property(lambda self: self._read("W_U", [self.unembed], lambda: self.unembed.W_U))
    b_U = property(lambda self: self._read("b_U", [self.unembed], lambda: self.unembed.b_U))

    def tokens_to_residual_directions(self, tokens: str | int | Tensor) -> Tensor:
        """The unembedding direction of each token, ``W_U[:, token]``: ``[d_model]`` for one token (an id
        or a single-token string), ``[... d_model]`` for a tensor of ids ``[...]``."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)  # type: ignore[attr-defined]
        W_U = self.W_U
        ids = torch.as_tensor(tokens, device=W_U.device)
        if ids.dtype.is_floating_point or not ((0 <= ids) & (ids < self.cfg.d_vocab)).all():
            raise ValueError(f"tokens must be ids in 0..{self.cfg.d_vocab - 1}, got {tokens!r}")
        return W_U[:, ids].movedim(0, -1)

    @property
    def QK(self) -> "FactoredMatrix":
        """Each head's QK circuit ``W_Q W_K^T`` as a ``[layer head d_model d_model]`` FactoredMatrix
        (K/V heads repeated to the query heads they serve). Rotary models rotate between the two
        factors, so there this is the circuit at zero relative distance."""
        from hooked_attn.factored_matrix import FactoredMatrix

        W_K = self.W_K.repeat_interleave(self.cfg.group_size, dim=1)
        return FactoredMatrix(self.W_Q, W_K.transpose(-2, -1))

    @property
    def OV(self) -> "FactoredMatrix":
        """Each head's OV circuit ``W_V W_O`` as a ``[layer head d_model d_model]`` FactoredMatrix."""
        from hooked_attn.factored_matrix import FactoredMatrix

        return FactoredMatrix(self.W_V.repeat_interleave(self.cfg.group_size, dim=1), self.W_O)

    @property
    def W_gate(self) -> Tensor:
        if not self.cfg.gated_mlp:
            raise AttributeError("W_gate")  # reported by __getattr__ below
        return self._stack("W_gate", lambda b: b.mlp.W_gate)

    @property
    def b_gate(self) -> Tensor:
        if not self.cfg.gated_mlp:
            raise AttributeError("b_gate")  # reported by __getattr__ below
        return self._stack("b_gate", lambda b: b.mlp.b_gate)

    @property
    def W_pos(self) -> Tensor:
        if not isinstance(self.cfg.positions, (LearnedPositions, ShortformerPositions)):
            raise AttributeError("W_pos")  # reported by __getattr__ below
        return self._read("W_pos", [self.pos_embed], lambda: self.pos_embed.W_pos)

    def __getattr__(self, name: str) -> Any:
        # nn.Module.__getattr__ would replace a property's AttributeError with a generic one.
        if name in _ABSENT_WEIGHTS:
            kind = type(self.cfg.positions).__name__
            positions = {"Rotary": "rotary positions", "Alibi": "ALiBi biases"}.get(kind, "no positional information")
            raise AttributeError(f"{name}: {_ABSENT_WEIGHTS[name].format(positions=positions)}")
        return super().__getattr__(name)  # type: ignore[misc]
