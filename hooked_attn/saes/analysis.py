"""Feature analysis: direct logit attribution of features, top-activating contexts over a corpus, and
attribution patching of features (first-order estimates of ablating them)."""

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_attn.saes.sae import SAE
from hooked_attn.saes.store import stop_layer_for


def feature_dla(
    model: object, sae: SAE, cache: object, features: Sequence[int], tokens: Int[Tensor, "batch pos"],
) -> Float[Tensor, "feature batch pos"]:
    """Each feature's direct contribution to the logit of ``tokens`` at every position.

    The feature's output ``act * W_dec[feature]`` (from ``cache``, a run with the SAE spliced) passes
    through the final norm as ``cache.apply_ln_to_stack`` treats a residual component (centred for
    LayerNorm, divided by the cached ``ln_final.hook_scale``), then through ``W_U``. Exact on a
    model processed with ``fold_ln`` when the SAE reads the final residual stream.
    """
    site = sae.cfg.hook_name_out or sae.cfg.hook_name
    acts = cache[f"{site}.hook_sae_acts_post"][..., list(features)]  # type: ignore[index]
    stack = acts.movedim(-1, 0)[..., None] * sae.W_dec[list(features), None, None, :].to(acts)
    normed = cache.apply_ln_to_stack(stack)  # type: ignore[attr-defined]
    W_U = model.W_U[:, tokens].to(normed)  # type: ignore[attr-defined]  # [d_model batch pos]
    return torch.einsum("fbpd,dbp->fbp", normed, W_U)


def top_activating_contexts(
    model: object, sae: SAE, tokens: Int[Tensor, "sequence pos"], features: Sequence[int], k: int = 5,
    batch_size: int = 8,
) -> tuple[Float[Tensor, "feature k"], Int[Tensor, "feature k 2"]]:
    """The ``k`` largest activations of each feature over a corpus and where they are: values and
    ``(sequence, position)`` indices, largest first. Runs the model only up to the SAE's hook."""
    hook = sae.cfg.hook_name
    stop = stop_layer_for([hook], model.cfg.n_layers)  # type: ignore[attr-defined,list-item]
    best_values = torch.full((len(features), k), -torch.inf)
    best_index = torch.zeros((len(features), k, 2), dtype=torch.long)
    n_pos = tokens.shape[1]
    with torch.no_grad():
        for lo in range(0, tokens.shape[0], batch_size):
            _, cache = model.run_with_cache(tokens[lo:lo + batch_size], names_filter=[hook],  # type: ignore[attr-defined]
                                            stop_at_layer=stop, return_type=None)
            x = cache[hook]
            if sae.cfg.hook_head_index is not None:
                x = x[..., sae.cfg.hook_head_index, :]
            acts = sae.encode(x)[..., list(features)].flatten(0, 1).T.float()  # [feature row]
            rows = torch.arange(acts.shape[1]) + lo * n_pos
            index = torch.stack([rows // n_pos, rows % n_pos], -1).expand(len(features), -1, -1)
            values = torch.cat([best_values, acts], 1)
            where = torch.cat([best_index, index], 1)
            best_values, top = values.topk(k, dim=1)
            best_index = where.gather(1, top[..., None].expand(-1, -1, 2))
    return best_values, best_index


def feature_attribution(
    model: object, sae: SAE, tokens: Int[Tensor, "batch pos"], metric: Callable[[Tensor], Tensor],
    corrupted_acts: Float[Tensor, "batch pos d_sae"] | None = None,
) -> Float[Tensor, "batch pos d_sae"]:
    """First-order estimate of the change in ``metric(logits)`` when each feature at each position is
    set from its value in this run to ``corrupted_acts`` (zero by default: ablation):
    ``(corrupted - act) * d metric / d act``, from one forward and backward with the SAE spliced
    with its error term (so the unpatched model is the clean model)."""
    site = sae.cfg.hook_name_out or sae.cfg.hook_name
    name = f"{site}.hook_sae_acts_post"
    # Backward inside the splice: gradients are cached under the hook's name when they arrive.
    with torch.enable_grad(), model.saes([sae], use_error_term=True):  # type: ignore[attr-defined]
        logits, cache = model.run_with_cache(tokens, names_filter=[name], incl_bwd="deferred")  # type: ignore[attr-defined]
        value = metric(logits)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError("feature attribution needs a metric that returns a scalar tensor")
        value.backward()
    acts, grad = cache[name], cache[name + "_grad"]
    target = torch.zeros_like(acts) if corrupted_acts is None else corrupted_acts.to(acts)
    return ((target - acts) * grad).detach()
