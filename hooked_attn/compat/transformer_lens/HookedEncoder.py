"""``transformer_lens.HookedEncoder``: hooked_attn's BERT-style encoder, also built from a TransformerLens config."""

import dataclasses
from typing import Any

from hooked_attn.compat.transformer_lens.HookedTransformer import _bind, init_weights
from hooked_attn.compat.transformer_lens.HookedTransformerConfig import HookedTransformerConfig
from hooked_attn.config import ModelConfig
from hooked_attn.encoder import HookedEncoder as _Base
from hooked_attn.weights import WeightsMixin

# The decoder's stacked-weight and circuit properties read only ``blocks``, ``embed`` and ``unembed``,
# which the encoder has too.
_SHARED = ["_read", "_stack", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_out", "b_in",
           "b_out", "W_E", "W_U", "b_U", "QK", "OV"]


class _ConfigError(ValueError, AssertionError):
    """A config HookedEncoder cannot build from (a ValueError, and the AssertionError TransformerLens raises)."""


class HookedEncoder(_Base):
    """``HookedEncoder(cfg)`` with a TransformerLens config builds a BERT layout (bidirectional,
    norms after each residual sum, two token types, the MLM head); hooked_attn's own signature
    ``HookedEncoder(model_cfg, n_token_types, mlm_head)`` works too."""

    def __init__(self, cfg: Any, *args: Any, tokenizer: Any = None, move_to_device: bool = True, **kwargs: Any) -> None:
        if isinstance(cfg, ModelConfig):
            super().__init__(cfg, *args, tokenizer=tokenizer, **kwargs)
            return
        cfg = HookedTransformerConfig.unwrap(cfg)
        if tokenizer is None and cfg.tokenizer_name:  # TransformerLens loads the named tokenizer
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name)
        if cfg.d_vocab <= 0:
            if tokenizer is None:
                raise _ConfigError("Must provide a tokenizer if d_vocab is not provided: HookedEncoder(cfg) "
                                   "needs cfg.d_vocab, cfg.tokenizer_name or tokenizer=")
            cfg.d_vocab = max(tokenizer.get_vocab().values()) + 1
            if cfg.d_vocab_out <= 0:
                cfg.d_vocab_out = cfg.d_vocab
        compat, model_cfg = _bind(dataclasses.replace(cfg, attention_dir="bidirectional"))
        model_cfg = model_cfg.replace(causal=False, block_norms="post_residual", embed_norm=model_cfg.norm)
        compat.__dict__["_model_cfg"] = model_cfg
        super().__init__(model_cfg, n_token_types=2, mlm_head=True, tokenizer=tokenizer)
        self.cfg = compat  # type: ignore[assignment]
        init_weights(self, compat)
        if move_to_device and compat.device is not None:
            self.to(compat.device)

    def encoder_output(self, tokens: Any, token_type_ids: Any = None, one_zero_attention_mask: Any = None) -> Any:
        """The final residual stream ``[batch pos d_model]`` (before any head), TransformerLens' name."""
        # the class's forward: BertNextSentencePrediction.run_with_cache swaps the instance's for its own
        return _Base.forward(self, tokens, return_type="embeddings", token_type_ids=token_type_ids,
                             attention_mask=one_zero_attention_mask)

    @property
    def W_pos(self) -> Any:
        return self.pos_embed.W_pos


for _name in _SHARED:
    setattr(HookedEncoder, _name, WeightsMixin.__dict__[_name])  # HookedTransformer's weight views


__all__ = ["HookedEncoder"]
