"""Small helpers that TransformerLens users expect under ``utils``: hook-name shorthand and the LM loss."""

import torch
from jaxtyping import Float, Int
from torch import Tensor

# Short site name -> hook path inside a block ("" prefix: directly on the block).
_BLOCK_SITES = {
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out",
    "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v", "rot_q": "attn.hook_rot_q",
    "rot_k": "attn.hook_rot_k", "attn_scores": "attn.hook_attn_scores", "scores": "attn.hook_attn_scores",
    "pattern": "attn.hook_pattern", "attn": "attn.hook_pattern", "z": "attn.hook_z",
    "result": "attn.hook_result",
    "pre": "mlp.hook_pre", "pre_linear": "mlp.hook_pre_linear", "post": "mlp.hook_post",
}
_TOP_SITES = {"embed": "hook_embed", "pos_embed": "hook_pos_embed"}
_NORM_SITES = {"scale": "hook_scale", "normalized": "hook_normalized"}


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """The full hook name for a short site name, as in TransformerLens.

    ``get_act_name("pattern", 3) == "blocks.3.attn.hook_pattern"``; ``get_act_name("embed") ==
    "hook_embed"``; ``get_act_name("scale", 2, "ln1") == "blocks.2.ln1.hook_scale"``;
    ``get_act_name("scale")`` is ``ln_final.hook_scale``. A name that already contains a dot is
    returned unchanged.

    Raises:
        ValueError: the short name is unknown, or a block site is given without a layer.
    """
    if "." in name or name.startswith("hook_"):
        return name
    if name in _TOP_SITES:
        return _TOP_SITES[name]
    if name in _NORM_SITES:
        if layer is None:
            return f"ln_final.{_NORM_SITES[name]}"
        norm = {"attn": "ln1", "mlp": "ln2", "a": "ln1", "m": "ln2", None: "ln1"}.get(layer_type, layer_type)
        return f"blocks.{layer}.{norm}.{_NORM_SITES[name]}"
    if name not in _BLOCK_SITES:
        known = sorted([*_BLOCK_SITES, *_TOP_SITES, *_NORM_SITES])
        raise ValueError(f"unknown activation name {name!r}; known short names: {', '.join(known)}")
    if layer is None:
        raise ValueError(f"activation {name!r} lives inside a block: give a layer, e.g. get_act_name({name!r}, 0)")
    return f"blocks.{layer}.{_BLOCK_SITES[name]}"


def lm_cross_entropy_loss(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None, per_token: bool = False,
) -> Float[Tensor, ""] | Float[Tensor, "batch pos_minus_1"]:
    """Next-token cross-entropy: position i predicts token i+1. Padding (mask 0) is left out of the mean."""
    log_probs = logits[:, :-1].float().log_softmax(dim=-1)
    loss = -log_probs.gather(-1, tokens[:, 1:, None])[..., 0]
    valid = None if attention_mask is None else (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    if per_token:
        return loss if valid is None else loss.masked_fill(~valid, 0.0)
    if loss.numel() == 0 or (valid is not None and not bool(valid.any())):
        # The mean of nothing is NaN: say so instead of returning it.
        raise ValueError(f"no token to score: the loss needs two consecutive real tokens in some row "
                         f"(tokens {tuple(tokens.shape)} [batch pos]); use loss_per_token=True for an empty loss")
    return loss.mean() if valid is None else loss[valid].mean()


def get_device() -> torch.device:
    """CUDA when it is available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
