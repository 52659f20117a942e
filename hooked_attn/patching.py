"""Activation, path and attribution patching, under TransformerLens' names and signatures.

Activation patching runs the corrupted input with one clean activation patched in, for every
site of a sweep, and reports ``patching_metric(logits)``. Sweeps are batched: many patched variants
run in one forward (each variant is its own slice of the batch), ``batch_size`` at a time.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from hooked_attn.cache import ActivationCache
from hooked_attn.hook_points import HookPoint
from hooked_attn.model import HookedTransformer
from hooked_attn.patch_inputs import SweepPlan, check_clean_cache, check_path_heads, plan_sweep  # check_clean_cache: re-exported
from hooked_attn.patch_setters import (  # noqa: F401  (re-exported: TransformerLens' patching names them)
    layer_head_dest_src_pos_pattern_patch_setter,
    layer_head_pattern_patch_setter,
    layer_head_pos_pattern_patch_setter,
    layer_head_vector_patch_setter,
    layer_pos_head_vector_patch_setter,
    layer_pos_patch_setter,
)
from hooked_attn.utils import get_act_name

Metric = Callable[[Tensor], Tensor | float]
# patch_setter(activation, index, clean_activation), as in TransformerLens: ``index`` is the whole
# row (layer first); the setter edits ``activation`` (this variant's slice of the batch) in place
# and may return it.
PatchSetter = Callable[[Tensor, tuple[int, ...], Tensor], Tensor | None]


def _metric_value(value: Tensor | float) -> float:
    if isinstance(value, Tensor) and value.numel() != 1 or not isinstance(value, (Tensor, int, float)):
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"patching_metric must return one number, got {got}")
    return float(value.item() if isinstance(value, Tensor) else value)


def _run_sweep(model: HookedTransformer, plan: SweepPlan, clean_cache: ActivationCache, patching_metric: Metric,
               patch_setter: PatchSetter, activation_name: str, progress: bool) -> Tensor:
    """The metric for every variant of a checked sweep, as a float64 tensor of ``plan.shape``."""
    tokens, attention_mask, indices, batch = plan.tokens, plan.attention_mask, plan.indices, plan.tokens.shape[0]
    # A patch in layer L leaves every earlier block as in the corrupted run, so each variant runs from
    # block L on, starting from the corrupted run's resid_pre there: the same result for a fraction of
    # the work. A site outside the blocks (hook_embed, ln_final) runs the whole forward instead.
    # Variants are grouped by layer and batched, ``plan.chunk`` per forward.
    sites = set(plan.names.values())
    with torch.no_grad():
        _, corrupted_cache = model.run_with_cache(
            tokens, attention_mask=attention_mask, names_filter=lambda n: n.endswith("hook_resid_pre") or n in sites)
    check_clean_cache(model, clean_cache, corrupted_cache, sorted(sites), "corrupted_tokens")  # the full shapes
    by_layer: dict[int, list[int]] = {}
    for i, index in enumerate(indices):
        by_layer.setdefault(index[0], []).append(i)
    work = [(layer, slots[start:start + plan.chunk]) for layer, slots in sorted(by_layer.items())
            for start in range(0, len(slots), plan.chunk)]
    results: list[float] = [0.0] * len(indices)
    for layer, slots in tqdm(work, disable=not progress or len(work) <= 1, desc=f"patching {activation_name}"):
        name = plan.names[layer]
        clean = clean_cache[name]

        def hook(act: Tensor, hook: HookPoint, slots: list[int] = slots, clean: Tensor = clean) -> Tensor:
            act = act.clone()
            clean_here = clean.to(act.device, act.dtype)
            for k, i in enumerate(slots):
                part = act[k * batch:(k + 1) * batch]
                patched = patch_setter(part, indices[i], clean_here)
                if patched is not None and patched is not part:
                    if not isinstance(patched, Tensor) or patched.shape != part.shape:
                        got = tuple(patched.shape) if isinstance(patched, Tensor) else type(patched).__name__
                        raise ValueError(f"patch_setter {getattr(patch_setter, '__name__', patch_setter)!r} returned "
                                         f"{got} for {name} at index {indices[i]}, but the activation has shape "
                                         f"{tuple(part.shape)}")
                    part.copy_(patched)
            return act

        n = len(slots)
        mask = None if attention_mask is None else attention_mask.repeat(n, 1)
        start = model.hook_dict[name].layer
        with torch.no_grad():
            if start is None:
                logits = model.run_with_hooks(tokens.repeat(n, 1), attention_mask=mask, fwd_hooks=[(name, hook)])
            else:
                resid = corrupted_cache[f"blocks.{start}.hook_resid_pre"]
                logits = model.run_with_hooks(resid.repeat(n, 1, 1), start_at_layer=start, tokens=tokens.repeat(n, 1),
                                              attention_mask=mask, fwd_hooks=[(name, hook)])
        for k, i in enumerate(slots):
            results[i] = _metric_value(patching_metric(logits[k * batch:(k + 1) * batch]))
    return torch.tensor(results, dtype=torch.float64).reshape(plan.shape)  # metric values, unrounded


def generic_activation_patch(
    model: HookedTransformer, corrupted_tokens: Tensor, clean_cache: ActivationCache, patching_metric: Metric,
    patch_setter: PatchSetter, activation_name: str, index_axis_names: Sequence[str] | None = None,
    index_df: Any = None, return_index_df: bool = False, batch_size: int | None = None, progress: bool = True,
    attention_mask: Tensor | None = None,
) -> Tensor | tuple[Tensor, Any]:
    """Patch ``activation_name`` (a short site name: "resid_pre", "z", "pattern", ...) at every index
    of ``index_axis_names`` (or the rows of ``index_df``), returning the metric per index.

    Args:
        index_axis_names: axes to sweep, from "layer", "pos", "head_index" (or "head"), "dest_pos",
            "src_pos"; the result has one axis per name, in that order.
        index_df: alternatively, an explicit table (pandas DataFrame or a list of tuples) of indices,
            one row per variant, columns in ``index_axis_names`` order; the result is then flat.
        batch_size: patched variants per forward (default: about 4096 token positions per forward).

    A site outside the blocks (``"embed"``, ``"pos_embed"``, a full name like ``"ln_final.hook_normalized"``)
    is the same activation whatever the layer, so every layer of the sweep gives the same value.

    Raises:
        ValueError: an index axis or row that does not fit the model and tokens, a batch size or
            attention mask that does not fit, the clean cache comes from another model or another batch
            (all before any forward pass); the clean activation's shape (batch, positions) differs from
            the corrupted run's (after its one forward, before the sweep); a ``patch_setter`` returns
            another shape.
    """
    plan = plan_sweep(model, corrupted_tokens, clean_cache, activation_name, index_axis_names, index_df,
                       batch_size, attention_mask)
    out = _run_sweep(model, plan, clean_cache, patching_metric, patch_setter, activation_name, progress)
    return (out, plan.indices) if return_index_df else out


def _sweep(activation_name: str, axes: Sequence[str], setter: PatchSetter) -> Callable[..., Tensor]:
    def sweep(model: HookedTransformer, corrupted_tokens: Tensor, clean_cache: ActivationCache,
              patching_metric: Metric, **kwargs: Any) -> Tensor:
        return generic_activation_patch(model, corrupted_tokens, clean_cache, patching_metric, setter,
                                        activation_name, index_axis_names=axes, **kwargs)  # type: ignore[return-value]

    sweep.__name__ = f"patch_{activation_name}_{'_'.join(axes)}"
    sweep.__doc__ = (f"Patch clean ``{activation_name}`` into the corrupted run at each "
                     f"({', '.join(axes)}); returns the metric as a ``[{' '.join(axes)}]`` tensor.")
    return sweep


get_act_patch_resid_pre = _sweep("resid_pre", ("layer", "pos"), layer_pos_patch_setter)
get_act_patch_resid_mid = _sweep("resid_mid", ("layer", "pos"), layer_pos_patch_setter)
get_act_patch_attn_out = _sweep("attn_out", ("layer", "pos"), layer_pos_patch_setter)
get_act_patch_mlp_out = _sweep("mlp_out", ("layer", "pos"), layer_pos_patch_setter)
get_act_patch_attn_head_out_by_pos = _sweep("z", ("layer", "pos", "head"), layer_pos_head_vector_patch_setter)
get_act_patch_attn_head_q_by_pos = _sweep("q", ("layer", "pos", "head"), layer_pos_head_vector_patch_setter)
get_act_patch_attn_head_k_by_pos = _sweep("k", ("layer", "pos", "head"), layer_pos_head_vector_patch_setter)
get_act_patch_attn_head_v_by_pos = _sweep("v", ("layer", "pos", "head"), layer_pos_head_vector_patch_setter)
get_act_patch_attn_head_pattern_by_pos = _sweep("pattern", ("layer", "head", "dest_pos"),
                                                layer_head_pos_pattern_patch_setter)
get_act_patch_attn_head_pattern_dest_src_pos = _sweep("pattern", ("layer", "head", "dest_pos", "src_pos"),
                                                      layer_head_dest_src_pos_pattern_patch_setter)
get_act_patch_attn_head_out_all_pos = _sweep("z", ("layer", "head"), layer_head_vector_patch_setter)
get_act_patch_attn_head_q_all_pos = _sweep("q", ("layer", "head"), layer_head_vector_patch_setter)
get_act_patch_attn_head_k_all_pos = _sweep("k", ("layer", "head"), layer_head_vector_patch_setter)
get_act_patch_attn_head_v_all_pos = _sweep("v", ("layer", "head"), layer_head_vector_patch_setter)
get_act_patch_attn_head_pattern_all_pos = _sweep("pattern", ("layer", "head"), layer_head_pattern_patch_setter)


def get_act_patch_block_every(
    model: HookedTransformer, corrupted_tokens: Tensor, clean_cache: ActivationCache, patching_metric: Metric,
    **kwargs: Any,
) -> Tensor:
    """``[3 layer pos]``: resid_pre, attn_out and mlp_out patching, stacked."""
    return torch.stack([f(model, corrupted_tokens, clean_cache, patching_metric, **kwargs)
                        for f in (get_act_patch_resid_pre, get_act_patch_attn_out, get_act_patch_mlp_out)])


def get_act_patch_attn_head_all_pos_every(
    model: HookedTransformer, corrupted_tokens: Tensor, clean_cache: ActivationCache, patching_metric: Metric,
    **kwargs: Any,
) -> Tensor:
    """``[5 layer head]``: output (z), q, k, v and pattern of each head, over all positions.
    k and v sweep the K/V heads, so with grouped-query attention their head axis is padded with NaN."""
    parts = [f(model, corrupted_tokens, clean_cache, patching_metric, **kwargs)
             for f in (get_act_patch_attn_head_out_all_pos, get_act_patch_attn_head_q_all_pos,
                       get_act_patch_attn_head_k_all_pos, get_act_patch_attn_head_v_all_pos,
                       get_act_patch_attn_head_pattern_all_pos)]
    width = model.cfg.n_heads
    return torch.stack([torch.nn.functional.pad(p, (0, width - p.shape[-1]), value=float("nan")) for p in parts])


def _check_same_shape(a: Tensor, b: Tensor, a_name: str, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} has shape {tuple(a.shape)} and {b_name} {tuple(b.shape)}: patching needs the "
                         "same batch and positions")


# -- path patching ---------------------------------------------------------------------------

Receiver = str | tuple[str, int]  # a hook name, or (hook name, head) for one head's q/k/v/z


def path_patch(
    model: HookedTransformer, orig_tokens: Tensor, new_tokens: Tensor, sender_heads: Sequence[tuple[int, int]],
    receivers: Sequence[Receiver], patching_metric: Metric, orig_cache: ActivationCache | None = None,
    new_cache: ActivationCache | None = None, freeze_mlps: bool = False,
) -> float:
    """The metric when the sender heads' outputs on ``new_tokens`` reach the receivers only directly.

    1. Run ``orig_tokens`` with every head's ``z`` frozen to its original value, except the senders,
       whose ``z`` comes from ``new_tokens`` (and, with ``freeze_mlps``, every ``mlp_out`` frozen
       too); record the receiver activations.
    2. Run ``orig_tokens`` again with only the receivers patched to those values; return the metric.

    Receivers are hook names (``blocks.3.attn.hook_q``, ``blocks.5.hook_resid_pre``...), or
    ``(name, head)`` to patch one head of a per-head activation.
    """
    def wanted(name: str) -> bool:
        return name.endswith("attn.hook_z") or (freeze_mlps and name.endswith("hook_mlp_out"))

    _check_same_shape(orig_tokens, new_tokens, "orig_tokens", "new_tokens")
    check_path_heads(model, sender_heads, receivers)
    receiver_names = [r if isinstance(r, str) else r[0] for r in receivers]
    model.resolve_hook_names(receiver_names)  # unknown names fail before anything runs
    if orig_cache is None:
        _, orig_cache = model.run_with_cache(orig_tokens, names_filter=wanted)
    else:
        with torch.no_grad():
            _, reference = model.run_with_cache(orig_tokens, names_filter=wanted)
        check_clean_cache(model, orig_cache, reference, list(reference.keys()), "orig_tokens")
    if new_cache is None:
        _, new_cache = model.run_with_cache(new_tokens, names_filter=lambda n: n.endswith("attn.hook_z"))
    else:
        with torch.no_grad():
            _, reference = model.run_with_cache(new_tokens, names_filter=lambda n: n.endswith("attn.hook_z"))
        check_clean_cache(model, new_cache, reference, list(reference.keys()), "new_tokens")
    senders: dict[int, list[int]] = {}
    for layer, head in sender_heads:
        senders.setdefault(layer, []).append(head)

    def freeze(act: Tensor, hook: HookPoint) -> Tensor:
        frozen = orig_cache[str(hook.name)].to(act.device, act.dtype).clone()
        if hook.name.endswith("attn.hook_z"):
            for head in senders.get(hook.layer, []):  # type: ignore[arg-type]
                frozen[:, :, head] = new_cache[str(hook.name)][:, :, head].to(act.device, act.dtype)
        return frozen

    recorded: dict[str, Tensor] = {}

    def record(act: Tensor, hook: HookPoint) -> None:
        recorded[str(hook.name)] = act.detach().clone()

    with torch.no_grad():
        model.run_with_hooks(orig_tokens, fwd_hooks=[(wanted, freeze), *[(n, record) for n in set(receiver_names)]])

        def patch(receiver: Receiver) -> tuple[str, Callable]:
            name, head = (receiver, None) if isinstance(receiver, str) else receiver

            def hook(act: Tensor, hook: HookPoint) -> Tensor:
                if head is None:
                    return recorded[name].to(act.dtype)
                act = act.clone()
                act[:, :, head] = recorded[name][:, :, head].to(act.dtype)
                return act
            return name, hook

        logits = model.run_with_hooks(orig_tokens, fwd_hooks=[patch(r) for r in receivers])
    return _metric_value(patching_metric(logits))


def path_patch_senders(
    model: HookedTransformer, orig_tokens: Tensor, new_tokens: Tensor, receivers: Sequence[Receiver],
    patching_metric: Metric, freeze_mlps: bool = False, progress: bool = True,
) -> Tensor:
    """``[layer head]``: ``path_patch`` with each head alone as the sender (NaN for heads that
    cannot reach any receiver: those in later layers, or in a receiver's own layer when the
    receiver sits before that layer's attention output)."""
    names = [r if isinstance(r, str) else r[0] for r in receivers]

    def reach(name: str) -> int:
        """How many layers' heads can write to the activation ``name``."""
        if not name.startswith("blocks."):
            return model.cfg.n_layers
        layer = int(name.split(".")[1])
        before_attn_out = ".attn." in name or ".ln1." in name or name.endswith("hook_resid_pre")
        return layer if before_attn_out else layer + 1

    _check_same_shape(orig_tokens, new_tokens, "orig_tokens", "new_tokens")
    model.resolve_hook_names(names)
    first = max(reach(n) for n in names)
    wanted = lambda n: n.endswith("attn.hook_z") or (freeze_mlps and n.endswith("hook_mlp_out"))  # noqa: E731
    _, orig_cache = model.run_with_cache(orig_tokens, names_filter=wanted)
    _, new_cache = model.run_with_cache(new_tokens, names_filter=lambda n: n.endswith("attn.hook_z"))
    out = torch.full((model.cfg.n_layers, model.cfg.n_heads), float("nan"), dtype=torch.float64)
    pairs = [(layer, head) for layer in range(first) for head in range(model.cfg.n_heads)]
    for layer, head in tqdm(pairs, disable=not progress, desc="path patching"):
        out[layer, head] = path_patch(model, orig_tokens, new_tokens, [(layer, head)], receivers, patching_metric,
                                      orig_cache, new_cache, freeze_mlps)
    return out


# -- attribution patching --------------------------------------------------------------------

_ATTRIBUTION_SITES = ("resid_pre", "resid_mid", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern")


def attribution_patch(
    model: HookedTransformer, clean_tokens: Tensor, corrupted_tokens: Tensor, patching_metric: Metric,
    sites: Sequence[str] = ("resid_pre", "attn_out", "mlp_out", "z"),
) -> dict[str, Tensor]:
    """First-order estimates of activation patching at every site, from one clean forward and one
    corrupted forward and backward: ``(clean - corrupted) . d metric / d activation``.

    Returns, per site, the estimated change of the metric when that clean activation is patched into
    the corrupted run: ``[layer pos]`` for residual-stream sites, ``[layer pos head]`` for q/k/v/z,
    ``[layer head dest_pos src_pos]`` for the pattern (summed over the batch).
    """
    unknown = [s for s in sites if s not in _ATTRIBUTION_SITES]
    if unknown:
        raise ValueError(f"unknown attribution sites {unknown}; known: {list(_ATTRIBUTION_SITES)}")
    _check_same_shape(clean_tokens, corrupted_tokens, "clean_tokens", "corrupted_tokens")
    names = [get_act_name(s, layer) for s in sites for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, clean = model.run_with_cache(clean_tokens, names_filter=names)
    leaf: list[Tensor] = []

    def differentiable(embed: Tensor, hook: HookPoint) -> Tensor:
        # The gradient is taken with respect to the activations only: a leaf here makes them
        # differentiable even with frozen parameters, and backward(inputs=...) leaves every .grad alone.
        leaf.append(embed.detach().requires_grad_(True))
        return leaf[-1]

    with torch.enable_grad(), model.hooks(fwd_hooks=[("hook_embed", differentiable)]):
        logits, corrupted = model.run_with_cache(corrupted_tokens, names_filter=names, incl_bwd="deferred")
        value = patching_metric(logits)
        if not isinstance(value, Tensor) or value.numel() != 1 or not value.requires_grad:
            raise ValueError("attribution patching needs a metric that returns a scalar tensor computed from the "
                             "logits (differentiable)")
        value.backward(inputs=leaf)
    out: dict[str, Tensor] = {}
    for site in sites:
        per_layer = []
        for layer in range(model.cfg.n_layers):
            name = get_act_name(site, layer)
            attr = (clean[name] - corrupted[name]) * corrupted[name + "_grad"]
            attr = attr.sum(0) if site == "pattern" else attr.sum(-1).sum(0)
            per_layer.append(attr.to(model.device))  # blocks spread over devices (hooked_attn.scale)
        out[site] = torch.stack(per_layer).detach()
    return out
