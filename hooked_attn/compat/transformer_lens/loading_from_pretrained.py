"""``transformer_lens.loading_from_pretrained``: loading goes through hooked_attn's loader.

A model is named by its HF repository id, a local folder, or one of TransformerLens' short names
for a checkpoint hooked_attn rebuilds (``"gpt2-small"`` for ``"gpt2"``; see ``MODEL_ALIASES``).
TransformerLens' own-format checkpoints (``solu-2l``, ``attn-only-2l``, ``othello-gpt``...) are not
HF checkpoints; loading one raises a ValueError saying so.
"""

import os
from typing import Any

from hooked_attn.compat.transformer_lens.HookedTransformerConfig import HookedTransformerConfig


def _series(org: str, stem: str, sizes: str, suffixes: tuple[str, ...] = ("",)) -> list[str]:
    return [f"{org}/{stem}{size}{suffix}" for size in sizes.split() for suffix in suffixes]


# HF checkpoints of the families hooked_attn rebuilds, by the repository id TransformerLens lists them under.
OFFICIAL_MODEL_NAMES: list[str] = [
    "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2",
    *_series("facebook", "opt-", "125m 350m 1.3b 2.7b 6.7b 13b 30b 66b"),
    *_series("EleutherAI", "gpt-neo-", "125M 1.3B 2.7B"), "EleutherAI/gpt-j-6B", "EleutherAI/gpt-neox-20b",
    *_series("EleutherAI", "pythia-", "14m 31m 70m 160m 410m 1b 1.4b 2.8b 6.9b 12b", ("", "-deduped")),
    *_series("roneneldan", "TinyStories-", "1M 3M 8M 28M 33M Instruct-1M Instruct-3M Instruct-8M Instruct-28M "
             "Instruct-33M 1Layer-21M 2Layers-33M Instuct-1Layer-21M Instruct-2Layers-33M"),
    *_series("bigscience", "bloom-", "560m 1b1 1b7 3b 7b1"),
    "microsoft/phi-1", "microsoft/phi-1_5", "microsoft/phi-2", "microsoft/Phi-3-mini-4k-instruct",
    *_series("google", "gemma-", "2b 7b 2b-it 7b-it 2-2b 2-9b 2-2b-it 2-9b-it 3-270m 3-270m-it"),
    *_series("meta-llama", "Llama-", "2-7b-hf 2-13b-hf 3.2-1B 3.2-3B 3.1-8B 3.2-1B-Instruct"),
    "mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1",
    *_series("Qwen", "Qwen2", "-0.5B -1.5B .5-0.5B .5-1.5B .5-3B .5-7B"), *_series("Qwen", "Qwen3-", "0.6B 1.7B 4B"),
    *_series("HuggingFaceTB", "SmolLM2-", "135M 360M 1.7B 135M-Instruct"),
    *_series("stanford-crfm", "", "alias-gpt2-small-x21 battlestar-gpt2-small-x49 caprica-gpt2-small-x81"),
]

# TransformerLens' short names -> repository id (matched case-insensitively).
MODEL_ALIASES: dict[str, str] = {
    "gpt2-small": "gpt2", "opt-125m": "facebook/opt-125m", "opt-1.3b": "facebook/opt-1.3b",
    "gpt-neo-125M": "EleutherAI/gpt-neo-125M", "gpt-j-6B": "EleutherAI/gpt-j-6B",
    "gpt-neox-20b": "EleutherAI/gpt-neox-20b", "pythia": "EleutherAI/pythia-70m",
    "stanford-gpt2-small-a": "stanford-crfm/alias-gpt2-small-x21", "bloom-560m": "bigscience/bloom-560m",
    "phi-1": "microsoft/phi-1", "phi-2": "microsoft/phi-2", "gemma-2b": "google/gemma-2b",
    **{f"pythia-{s}": f"EleutherAI/pythia-{s}" for s in "14m 31m 70m 160m 410m 1b 1.4b 2.8b 6.9b 12b".split()},
    **{f"tiny-stories-{s}": f"roneneldan/TinyStories-{s}" for s in "1M 3M 8M 28M 33M".split()},
}

# TransformerLens' own checkpoint format (not HF): hooked_attn cannot read these.
TRANSFORMER_LENS_NATIVE = ("solu-", "gelu-", "attn-only-", "othello-gpt", "redwood_attn_2l")


def get_official_model_name(model_name: str) -> str:
    """The repository id for a TransformerLens short name; any other name (an HF id, a local folder)
    is returned unchanged, for hooked_attn loads any HF checkpoint of a family it rebuilds."""
    lowered = {alias.lower(): repo for alias, repo in MODEL_ALIASES.items()}
    return lowered.get(model_name.lower(), model_name)


def check_not_native(model_name: Any) -> None:
    """Refuse TransformerLens' own-format checkpoints by name, before anything is fetched."""
    if (isinstance(model_name, str) and model_name.lower().startswith(TRANSFORMER_LENS_NATIVE)
            and "/" not in model_name and not os.path.exists(model_name)):  # a short name, not a folder or repo id
        raise ValueError(f"{model_name!r} is a TransformerLens-format checkpoint (its own state dict, not an HF "
                         "model); hooked_attn loads HF checkpoints only")


def get_pretrained_model_config(model_name: str, **kwargs: Any) -> HookedTransformerConfig:
    """A TransformerLens config describing the HF model ``model_name`` (its config is read, not its weights)."""
    import transformers

    from hooked_attn.architectures import by_kind

    check_not_native(model_name)
    hf = transformers.AutoConfig.from_pretrained(get_official_model_name(model_name))
    arch = (hf.architectures or [type(hf).__name__])[0]
    decoders = by_kind("decoder")  # BERT shares the registry (kind "encoder"); this config is a decoder's
    if arch not in decoders:
        raise ValueError(f"{arch} is not an architecture hooked_attn rebuilds; supported: {sorted(decoders)}")
    return config_from_model_config(decoders[arch].config_from_hf(hf), model_name=model_name, **kwargs)


class BasicConfig:
    """TransformerLens' ``get_basic_config`` answer: the model's shape fields only."""

    def __init__(self, cfg: HookedTransformerConfig) -> None:
        self.d_model, self.d_vocab, self.n_ctx, self.d_head = cfg.d_model, cfg.d_vocab, cfg.n_ctx, cfg.d_head
        self.d_mlp, self.n_heads, self.n_layers = cfg.d_mlp, cfg.n_heads, cfg.n_layers
        self.layer_norm_eps, self.init_range, self.act_fn = cfg.eps, cfg.initializer_range, cfg.act_fn
        self.normalization_type, self.positional_embedding_type = cfg.normalization_type, cfg.positional_embedding_type
        self.original_architecture = cfg.original_architecture

    def __repr__(self) -> str:
        return f"BasicConfig({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


def get_basic_config(model_name: str, **kwargs: Any) -> BasicConfig:
    """The shape of the HF model ``model_name`` (``d_model``, ``n_layers``, ``layer_norm_eps``...)."""
    return BasicConfig(get_pretrained_model_config(model_name, **kwargs))


def config_from_model_config(cfg: Any, model_name: str = "custom", **overrides: Any) -> HookedTransformerConfig:
    """The TransformerLens config with the fields a hooked_attn ``ModelConfig`` determines."""
    from hooked_attn.config import Alibi, Rotary, ShortformerPositions

    rotary = cfg.positions if isinstance(cfg.positions, Rotary) else None
    kind = {"layernorm": "LN", "rmsnorm": "RMS"}[cfg.norm.kind] + ("" if cfg.norm.weight else "Pre")
    fields: dict[str, Any] = dict(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_ctx=cfg.n_ctx, d_head=cfg.d_head, model_name=model_name,
        n_heads=cfg.n_heads, d_mlp=None if cfg.attn_only else cfg.d_mlp, act_fn=cfg.act_fn, d_vocab=cfg.d_vocab,
        eps=cfg.norm.eps, normalization_type=kind, original_architecture=cfg.hf_architecture,
        positional_embedding_type="rotary" if rotary else "alibi" if isinstance(cfg.positions, Alibi)
        else "shortformer" if isinstance(cfg.positions, ShortformerPositions) else "standard",
        rotary_dim=rotary.n_rotary_dims if rotary else None, rotary_base=rotary.base if rotary else 10000.0,
        rotary_adjacent_pairs=bool(rotary and rotary.pairing == "interleaved"),
        n_key_value_heads=cfg.n_kv_heads if cfg.n_kv_heads != cfg.n_heads else None, gated_mlp=cfg.gated_mlp,
        parallel_attn_mlp=cfg.parallel_attn_mlp, attn_only=cfg.attn_only, attn_scale=1.0 / cfg.attn_scale,
        attention_dir="causal" if cfg.causal else "bidirectional",
    )
    return HookedTransformerConfig(**(fields | overrides))


__all__ = ["MODEL_ALIASES", "OFFICIAL_MODEL_NAMES", "config_from_model_config", "from_pretrained", "get_basic_config",
           "get_official_model_name", "get_pretrained_model_config"]
