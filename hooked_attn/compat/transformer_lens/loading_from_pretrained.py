"""``transformer_lens.loading_from_pretrained``: loading goes through hooked_attn's loader.

TransformerLens' alias table (``"gpt2-small"`` for ``"gpt2"``) is its own; here a model is named by its
HF repository id or a local folder.
"""

from typing import Any

from hooked_attn.compat.transformer_lens.HookedTransformerConfig import HookedTransformerConfig


def from_pretrained(model_name_or_path: Any, **kwargs: Any) -> Any:
    """Load a model (see ``hooked_attn.HookedTransformer.from_pretrained``)."""
    from hooked_attn.compat.transformer_lens.HookedTransformer import HookedTransformer

    return HookedTransformer.from_pretrained(model_name_or_path, **kwargs)


def get_official_model_name(model_name: str) -> str:
    """The name hooked_attn loads: the HF repository id or folder, unchanged (no alias table)."""
    return model_name


def get_pretrained_model_config(model_name: str, **kwargs: Any) -> HookedTransformerConfig:
    """A TransformerLens config describing the HF model ``model_name`` (its config is read, not its weights)."""
    import transformers

    from hooked_attn.architectures import by_kind

    hf = transformers.AutoConfig.from_pretrained(model_name)
    arch = (hf.architectures or [type(hf).__name__])[0]
    decoders = by_kind("decoder")  # BERT shares the registry (kind "encoder"); this config is a decoder's
    if arch not in decoders:
        raise ValueError(f"{arch} is not an architecture hooked_attn rebuilds; supported: {sorted(decoders)}")
    return config_from_model_config(decoders[arch].config_from_hf(hf), model_name=model_name, **kwargs)


def config_from_model_config(cfg: Any, model_name: str = "custom", **overrides: Any) -> HookedTransformerConfig:
    """The TransformerLens config with the fields a hooked_attn ``ModelConfig`` determines."""
    from hooked_attn.config import Alibi, Rotary

    rotary = cfg.positions if isinstance(cfg.positions, Rotary) else None
    kind = {"layernorm": "LN", "rmsnorm": "RMS"}[cfg.norm.kind] + ("" if cfg.norm.weight else "Pre")
    fields: dict[str, Any] = dict(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_ctx=cfg.n_ctx, d_head=cfg.d_head, model_name=model_name,
        n_heads=cfg.n_heads, d_mlp=None if cfg.attn_only else cfg.d_mlp, act_fn=cfg.act_fn, d_vocab=cfg.d_vocab,
        eps=cfg.norm.eps, normalization_type=kind, original_architecture=cfg.hf_architecture,
        positional_embedding_type="rotary" if rotary else "alibi" if isinstance(cfg.positions, Alibi) else "standard",
        rotary_dim=rotary.n_rotary_dims if rotary else None, rotary_base=rotary.base if rotary else 10000.0,
        rotary_adjacent_pairs=bool(rotary and rotary.pairing == "interleaved"),
        n_key_value_heads=cfg.n_kv_heads if cfg.n_kv_heads != cfg.n_heads else None, gated_mlp=cfg.gated_mlp,
        parallel_attn_mlp=cfg.parallel_attn_mlp, attn_only=cfg.attn_only, attn_scale=1.0 / cfg.attn_scale,
        attention_dir="causal" if cfg.causal else "bidirectional",
    )
    return HookedTransformerConfig(**(fields | overrides))


__all__ = ["config_from_model_config", "from_pretrained", "get_official_model_name", "get_pretrained_model_config"]
