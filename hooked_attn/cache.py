"""ActivationCache: the activations of one forward pass, by hook name, with TransformerLens' shorthand."""

from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn

from hooked_attn.cache_memory import (  # re-exported: the public names keep this import path
    CacheMemory,  # noqa: F401
    estimate_cache_memory,  # noqa: F401
    storage_nbytes,
)
from hooked_attn.config import ModelConfig, ShortformerPositions
from hooked_attn.utils import get_act_name


@runtime_checkable
class AnalysedModel(Protocol):
    """What the residual-stream analyses read from the model that made a cache. ``HookedTransformer``
    has all of it; a wrapped model (``wrap()``) has hooks but none of it, and its cache says so."""

    cfg: ModelConfig
    hook_dict: Mapping[str, nn.Module]
    blocks: Sequence[nn.Module]  # blocks[i].attn.W_O, blocks[i].mlp.W_out
    W_U: Tensor

    def unembed(self, resid: Tensor) -> Tensor: ...

    def to_single_token(self, text: str) -> int: ...


_ANALYSED_MODEL_NEEDS = ("cfg", "hook_dict", "blocks", "W_U", "unembed", "to_single_token")


_DECOMPOSE_MODES = ("all", "attn", "mlp")
PosSlice = int | slice | Sequence[int] | Tensor | None


def _take_pos(t: Tensor, pos_slice: PosSlice, pos_axis: int = -2) -> Tensor:
    """Select positions: an int drops the axis; a slice, a list or a tensor keeps it."""
    if pos_slice is None:
        return t
    index = [slice(None)] * t.ndim
    index[pos_axis] = torch.as_tensor(pos_slice) if isinstance(pos_slice, (list, tuple)) else pos_slice
    return t[tuple(index)]


class ActivationCache(Mapping[str, Tensor]):
    """A read-only mapping of hook name to tensor, with the residual-stream analyses of TransformerLens.

    ``cache["blocks.3.attn.hook_pattern"]``, ``cache["pattern", 3]`` and ``cache["scale", 3, "ln1"]``
    name the same kind of entry; a missing name raises a KeyError that lists what was cached.
    Stacks returned by the analyses are ``[component batch pos d_model]``; ``pos_slice`` selects
    positions (an int drops the axis).
    """

    def __init__(
        self, cache_dict: dict[str, Tensor], model: nn.Module | None = None,
        has_batch_dim: bool = True,
    ) -> None:
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    def _key(self, key: str | tuple) -> str:
        if isinstance(key, tuple):
            n_layers = getattr(getattr(self.model, "cfg", None), "n_layers", None)
            if len(key) > 1 and isinstance(key[1], int) and key[1] < 0 and n_layers is not None:
                key = (key[0], key[1] + n_layers, *key[2:])  # TransformerLens: -1 is the last layer
            # A wrapped model numbers its own attention layers (hooked_attn.wrap: attention_layers).
            resolve = getattr(self.model, "resolve_act_name", None)
            resolved = resolve(*key) if resolve is not None else None
            return resolved if resolved is not None else get_act_name(*key)
        if key in self.cache_dict:
            return key
        return get_act_name(key)

    def __getitem__(self, key: str | tuple) -> Tensor:  # type: ignore[override]
        name = self._key(key)
        n_layers = getattr(getattr(self.model, "cfg", None), "n_layers", None)
        if name not in self.cache_dict and isinstance(key, tuple) and len(key) > 1 and isinstance(key[1], int) \
                and n_layers is not None and not -n_layers <= key[1] < n_layers:
            raise KeyError(f"layer {key[1]} of {key!r} is outside this model's {n_layers} layers "
                           f"(0 to {n_layers - 1}, or -{n_layers} to -1 from the end)")
        if name not in self.cache_dict:
            cached = ", ".join(list(self.cache_dict)[:8]) + (" ..." if len(self.cache_dict) > 8 else "")
            raise KeyError(f"{name!r} is not in this cache ({len(self.cache_dict)} entries: {cached})")
        return self.cache_dict[name]

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, (str, tuple)):
            return False
        try:
            return self._key(key) in self.cache_dict
        except (ValueError, TypeError):
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations, has_batch_dim={self.has_batch_dim})"

    @property
    def nbytes(self) -> int:
        """The memory this cache keeps alive, in bytes (storage shared between entries counted once)."""
        return storage_nbytes(self.cache_dict.values())

    def to(self, device: torch.device | str, move_model: bool = False) -> "ActivationCache":
        """Move every tensor to ``device`` (and the model too, if asked)."""
        if move_model and self.model is not None:  # first: a model that refuses leaves the cache as it was
            self.model.to(device)
        self.cache_dict = {name: t.to(device) for name, t in self.cache_dict.items()}
        return self

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop the batch axis of a batch-of-one cache.

        Raises:
            ValueError: the batch is not of size one, or the batch axis is already gone.
        """
        if not self.has_batch_dim:
            raise ValueError("this cache has no batch dimension left to remove")
        for name, t in self.cache_dict.items():
            if t.shape[0] != 1:
                raise ValueError(f"cannot remove the batch dimension: {name} has batch size {t.shape[0]}, not 1")
        self.cache_dict = {name: t[0] for name, t in self.cache_dict.items()}
        self.has_batch_dim = False
        return self

    # -- residual-stream analyses (need the model that produced the cache) --------------------

    def _model(self) -> AnalysedModel:
        if self.model is None:
            raise ValueError("this analysis needs the model: build the cache with model.run_with_cache")
        missing = [name for name in _ANALYSED_MODEL_NEEDS if not hasattr(self.model, name)]
        if missing:
            raise TypeError(f"this analysis needs a transformer model like HookedTransformer (with "
                            f"{', '.join(_ANALYSED_MODEL_NEEDS)}); this cache was made by a "
                            f"{type(self.model).__name__}, which has no {', '.join(missing)}")
        return self.model  # type: ignore[return-value]

    def _n_layers_upto(self, layer: int | None) -> int:
        n = self._model().cfg.n_layers
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise TypeError(f"layer must be an int (or None), got {layer!r}")
        layer = n if layer is None or layer == -1 else layer  # TransformerLens: None or -1 is the final stream
        if not 0 <= layer <= n:
            raise ValueError(f"layer must be in 0..{n} (n_layers, -1 or None = the final residual stream), got {layer}")
        return layer

    def accumulated_resid(
        self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False, pos_slice: PosSlice = None,
        mlp_input: bool = False, return_labels: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:  # [component batch pos d_model]
        """The residual stream entering each block up to and including ``layer`` (None or n_layers:
        every block, then the final ``resid_post``), optionally with each ``resid_mid``;
        ``mlp_input`` adds block ``layer``'s ``resid_mid``; ``apply_ln`` scales each by the norm that
        reads the last one (see ``apply_ln_to_stack``)."""
        upto = self._n_layers_upto(layer)
        n_layers = self._model().cfg.n_layers
        parts, labels = [], []
        for i in range(min(upto + 1, n_layers)):
            parts.append(self[f"blocks.{i}.hook_resid_pre"])
            labels.append(f"{i}_pre")
            has_mid = f"blocks.{i}.hook_resid_mid" in self._model().hook_dict  # not in attention-only blocks
            if has_mid and ((incl_mid and i < upto) or (mlp_input and i == upto)):
                parts.append(self[f"blocks.{i}.hook_resid_mid"])
                labels.append(f"{i}_mid")
        if upto == n_layers:
            parts.append(self[f"blocks.{upto - 1}.hook_resid_post"])
            labels.append("final_post")
        stack = torch.stack(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, upto, mlp_input=mlp_input)
        stack = _take_pos(stack, pos_slice)
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self, layer: int | None = None, mlp_input: bool = False, mode: str = "all", apply_ln: bool = False,
        pos_slice: PosSlice = None, incl_embeds: bool = True, return_labels: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:  # [component batch pos d_model]
        """The residual stream at ``layer`` split into what wrote it: the embeddings, then each
        block's ``attn_out`` and ``mlp_out`` (``mode`` "attn" or "mlp" keeps one kind). The
        components sum exactly to the residual stream (with ``mode="all"`` and the embeddings)."""
        if mode not in _DECOMPOSE_MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, _DECOMPOSE_MODES))}, got {mode!r}")
        model = self._model()
        cfg = model.cfg
        if cfg.block_norms in ("post_residual", "normed_residual"):
            raise ValueError(f"a model with block_norms={cfg.block_norms!r} rewrites its residual stream in every "
                             "block (it carries a normalised copy forward): it has no additive decomposition")
        upto = self._n_layers_upto(layer)
        parts, labels = [], []
        if incl_embeds:
            if cfg.embed_norm is not None:  # the embedding norm's output is what enters block 0
                parts.append(self["blocks.0.hook_resid_pre"])
                labels.append("embed")
            else:
                parts.append(self["hook_embed"])
                labels.append("embed")
                if "hook_pos_embed" in model.hook_dict and not isinstance(cfg.positions, ShortformerPositions):
                    parts.append(self["hook_pos_embed"])
                    labels.append("pos_embed")
        # A parallel block's MLP reads resid_pre, beside its attention: not that attention's output.
        with_attn_at = upto + (1 if mlp_input and not cfg.parallel_attn_mlp else 0)
        for i in range(upto + (1 if mlp_input else 0)):
            if mode in ("all", "attn") and i < with_attn_at:
                parts.append(self[f"blocks.{i}.hook_attn_out"])
                labels.append(f"{i}_attn_out")
            if mode in ("all", "mlp") and i < upto and f"blocks.{i}.hook_mlp_out" in model.hook_dict:
                parts.append(self[f"blocks.{i}.hook_mlp_out"])
                labels.append(f"{i}_mlp_out")
        if not parts:
            raise ValueError("nothing to decompose: no layers and no embeddings selected")
        stack = torch.stack(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, upto, mlp_input=mlp_input)
        stack = _take_pos(stack, pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_head_results(
        self, layer: int | None = None, return_labels: bool = False, incl_remainder: bool = False,
        pos_slice: PosSlice = None, apply_ln: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:  # [component batch pos d_model]
        """Each head's write to the residual stream, ``[layer*head batch pos d_model]`` for the
        blocks before ``layer``: ``hook_result`` where cached, else ``z @ W_O`` from ``hook_z``.
        ``incl_remainder`` adds the residual stream minus all of them (biases, MLPs, embeddings)."""
        model = self._model()
        upto = self._n_layers_upto(layer)
        parts, labels = [], []
        for i in range(upto):
            if f"blocks.{i}.attn.hook_result" in self.cache_dict:
                result = self[f"blocks.{i}.attn.hook_result"]
            else:  # "...": batch pos, or pos alone in a cache without its batch dim
                z = self[f"blocks.{i}.attn.hook_z"]
                result = einops.einsum(z, model.blocks[i].attn.W_O.to(z.device),
                                       "... pos head d_head, head d_head d_model -> ... pos head d_model")
            heads = einops.rearrange(result, "... pos head d_model -> head ... pos d_model")
            parts.append(self._through_post_norm(heads, i, "ln1_post"))
            labels += [f"L{i}H{h}" for h in range(result.shape[-2])]
        stack = torch.cat(parts) if parts else torch.zeros(0, *self["hook_embed"].shape)
        if incl_remainder:
            total = self.accumulated_resid(upto)[-1]
            stack = torch.cat([stack, (total - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, upto)
        stack = _take_pos(stack, pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_neuron_results(
        self, layer: int | None = None, pos_slice: PosSlice = None, neuron_slice: slice | Sequence[int] | None = None,
        return_labels: bool = False, incl_remainder: bool = False, apply_ln: bool = False,
    ) -> Tensor | tuple[Tensor, list[str]]:  # [component batch pos d_model]
        """Each MLP neuron's write to the residual stream (``post[n] * W_out[n]``), for the blocks
        before ``layer``; ``neuron_slice`` keeps some neurons of every layer."""
        model = self._model()
        if model.cfg.moe is not None:
            raise ValueError("mixture-of-experts MLPs have no single set of neurons to stack")
        upto = self._n_layers_upto(layer)
        parts, labels = [], []
        keep = slice(None) if neuron_slice is None else neuron_slice
        if not isinstance(keep, slice):
            keep = _neuron_ids(keep, model.cfg.d_mlp)
        for i in range(upto):
            post = _take_pos(self[f"blocks.{i}.mlp.hook_post"], pos_slice)[..., keep]
            W_out = model.blocks[i].mlp.W_out[keep].to(post.device)
            neurons = einops.einsum(post, W_out, "... d_mlp, d_mlp d_model -> d_mlp ... d_model")
            parts.append(self._through_post_norm(neurons, i, "ln2_post", pos_slice))
            ids = range(model.cfg.d_mlp)[keep] if isinstance(keep, slice) else keep.tolist()
            labels += [f"L{i}N{n}" for n in ids]
        stack = torch.cat(parts)
        if incl_remainder:
            total = _take_pos(self.accumulated_resid(upto)[-1], pos_slice)
            stack = torch.cat([stack, (total - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, upto, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _through_post_norm(self, parts: Tensor, layer: int, norm_name: str, pos_slice: PosSlice = None) -> Tensor:
        """Components ``[component ... d_model]`` of a sublayer's output as they reach the residual stream
        when a norm follows the sublayer (Gemma 2's ``ln1_post``, OLMo 2's): given its cached scale the
        norm is linear, so each part is centred (LayerNorm), divided by the scale and multiplied by the
        gain; the norm's bias (and the sublayer's) stays in the remainder."""
        norm = getattr(self._model().blocks[layer], norm_name, None)
        if norm is None:
            return parts
        name = f"blocks.{layer}.{norm_name}.hook_scale"
        if name not in self.cache_dict:
            raise KeyError(f"{name!r} is not in the cache: block {layer} normalises this sublayer's output, so its "
                           "per-component writes need that scale (cache it, or cache everything)")
        if norm.cfg.kind == "layernorm":
            parts = parts - parts.mean(-1, keepdim=True)
        parts = parts / _take_pos(self[name], pos_slice).to(parts.device)
        if norm.w is not None:
            parts = parts * (norm.w + norm.cfg.weight_offset).to(parts.device, parts.dtype)
        return parts

    def apply_ln_to_stack(
        self, residual_stack: Float[Tensor, "... batch pos d_model"], layer: int | None = None,
        mlp_input: bool = False, pos_slice: PosSlice = None,
    ) -> Float[Tensor, "... batch pos d_model"]:
        """Treat each component as if it passed through the norm that reads the residual stream at
        ``layer`` (``ln_final`` at the end, ``ln1`` of block ``layer``, ``ln2`` with ``mlp_input``):
        centre it (LayerNorm) and divide by that norm's cached scale. Being linear, this keeps the
        components summing to the normalised stream; gains and biases are left out, so on a model
        processed with ``fold_ln`` the result feeds the unembedding exactly."""
        model = self._model()
        upto = self._n_layers_upto(layer)
        if upto == model.cfg.n_layers:  # past the last block only ln_final reads the stream (mlp_input or not)
            name = "ln_final.hook_scale"
        else:
            name = f"blocks.{upto}.{'ln2' if mlp_input else 'ln1'}.hook_scale"
        if name not in model.hook_dict:  # no norm reads the residual stream there (no final norm, say)
            return residual_stack
        if name not in self.cache_dict:
            raise KeyError(f"apply_ln needs {name!r} in the cache: cache it (names_filter) or run with it")
        scale = _take_pos(self[name], pos_slice)
        lead = scale.shape[:-1]  # [batch pos], fewer axes for a sliced position or no batch dim
        if tuple(residual_stack.shape[-1 - len(lead):-1]) != tuple(lead):
            raise ValueError(
                f"the stack has shape {tuple(residual_stack.shape)}, but {name} (with pos_slice={pos_slice!r}) is "
                f"{tuple(scale.shape)}: the stack's axes before d_model must be {tuple(lead)}; pass the pos_slice "
                "the stack was made with")
        if model.cfg.norm.kind == "layernorm":
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
        return residual_stack / scale

    def logit_attrs(
        self, residual_stack: Float[Tensor, "component batch *pos d_model"], tokens: Tensor | int | str,
        incorrect_tokens: Tensor | int | str | None = None, pos_slice: PosSlice = None,
    ) -> Tensor:  # [component batch pos]
        """Each component's direct contribution to the logit of ``tokens`` (minus ``incorrect_tokens``):
        ``component @ W_U[:, token]``. ``tokens`` is one id or string for every position, or ids
        broadcastable to ``[batch pos]``. Apply the final norm first (``apply_ln=True``)."""
        model = self._model()
        if pos_slice is not None and residual_stack.ndim < (4 if self.has_batch_dim else 3):
            raise ValueError(f"pos_slice={pos_slice!r} selects positions, but the stack {tuple(residual_stack.shape)} has "
                             "no pos axis (was it made with a pos_slice already?): it would slice another axis")
        stack = _take_pos(residual_stack, pos_slice)
        lead = tuple(stack.shape[1:-1])  # [batch pos], [batch] after an int pos_slice, [pos] without batch

        def direction(t: Tensor | int | str, what: str) -> Tensor:
            ids = torch.as_tensor(model.to_single_token(t) if isinstance(t, str) else t)
            d_vocab = model.W_U.shape[-1]
            if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
                raise ValueError(f"{what} must be token ids (int), got dtype {ids.dtype}")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= d_vocab):
                raise ValueError(f"{what} holds ids outside 0..{d_vocab - 1}: min {int(ids.min())}, max {int(ids.max())}")
            # A tensor lines up with the stack's axes from the left, one id per row (and position): a
            # shorter one would broadcast against the last axis instead, [batch] against pos.
            if ids.ndim and (ids.ndim != len(lead) or any(a not in (1, b) for a, b in zip(ids.shape, lead))):
                raise ValueError(
                    f"{what} has shape {tuple(ids.shape)}, but the stack {tuple(stack.shape)} has {lead} between "
                    "component and d_model: give one id, or ids of that shape (size-1 axes broadcast), "
                    "e.g. ids[:, None] for one id per row")
            return model.W_U[:, ids.to(model.W_U.device)].movedim(0, -1)  # [... d_model]

        dirs = direction(tokens, "tokens")
        if incorrect_tokens is not None:
            dirs = dirs - direction(incorrect_tokens, "incorrect_tokens")
        return (stack * dirs.to(stack.device, stack.dtype)).sum(-1)

    def logit_lens(
        self, layer: int | None = None, incl_mid: bool = False, pos_slice: PosSlice = None,
    ) -> Tensor:  # [component batch pos d_vocab]
        """The logits each accumulated residual stream would give if the model stopped there: each one
        through the real final norm (its own statistics, gain and bias) and the unembedding."""
        model = self._model()
        stack = self.accumulated_resid(layer, incl_mid=incl_mid, pos_slice=pos_slice)
        with torch.no_grad():  # computed where the model's final norm and unembedding are; returned here
            normed = model.ln_final(_to_module(stack, model.ln_final)) if model.cfg.final_norm else stack
            logits = model.unembed(_to_module(normed, model.unembed))
            cap = model.cfg.output_logits_soft_cap  # as the model's own logits (Gemma 2)
            if cap is not None and cap > 0:
                logits = torch.tanh(logits / cap) * cap
            return logits.to(stack.device)


def _neuron_ids(ids: Sequence[int] | Tensor | int, d_mlp: int) -> Tensor:
    """``neuron_slice`` given as ids: a 1-D tensor of in-range ints."""
    ids_t = torch.as_tensor(ids)
    if ids_t.ndim != 1 or ids_t.dtype.is_floating_point or ids_t.dtype == torch.bool:
        raise ValueError(f"neuron_slice must be a slice or a list of neuron ids, got {ids!r}")
    if ids_t.numel() and (int(ids_t.min()) < -d_mlp or int(ids_t.max()) >= d_mlp):
        raise ValueError(f"neuron_slice holds ids outside 0..{d_mlp - 1}: {ids!r}")
    return ids_t % d_mlp  # -1 is the last neuron, labelled as such


def _to_module(x: Tensor, module: nn.Module) -> Tensor:
    """``x`` on the device of ``module``'s weights. A module spread by ``hooked_attn.scale`` (an
    accelerate hook: its weights may wait on disk) moves its input itself."""
    weight = next(module.parameters(), None)
    return x if weight is None or hasattr(module, "_hf_hook") else x.to(weight.device)
