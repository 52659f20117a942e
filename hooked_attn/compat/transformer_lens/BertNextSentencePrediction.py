"""``transformer_lens.BertNextSentencePrediction``: next-sentence prediction over a HookedEncoder.

The wrapper runs ``model.encoder_output`` then ``model.pooler`` and ``model.nsp_head`` (logits
``[batch 2]``: index 0 = the second sentence follows the first). hooked_attn's BERT loader does not
load the pooler or the NSP head (it builds the masked-LM model), so a HookedEncoder needs both set
by the caller; without them ``forward`` raises a ValueError saying so.
"""

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hooked_attn.compat.transformer_lens.ActivationCache import ActivationCache
from hooked_attn.cache import ActivationCache as _BaseCache

PREDICTIONS = ("The sentences are sequential", "The sentences are NOT sequential")


class BertNextSentencePrediction(nn.Module):
    """A module (so an ActivationCache can name it as its model) holding the encoder as ``model``."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def to_tokens(self, input: list[str], move_to_device: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """``(tokens, token_type_ids, attention_mask)`` of a pair of sentences, each ``[1 pos]``."""
        if len(input) != 2:
            raise ValueError("Next sentence prediction task requires exactly two sentences, "
                             f"got {len(input)}")
        enc = self.model.tokenizer(input[0], input[1], return_tensors="pt", padding=True, truncation=True,
                                   max_length=self.model.cfg.n_ctx)
        out = (enc["input_ids"], enc["token_type_ids"], enc["attention_mask"])
        if move_to_device:
            out = tuple(t.to(self.model.cfg.device) for t in out)  # type: ignore[assignment]
        return out

    def forward(self, input: Tensor | list[str], return_type: Literal["logits", "predictions"] | None = "logits",
                token_type_ids: Tensor | None = None, one_zero_attention_mask: Tensor | None = None) -> Any:
        """NSP logits ``[batch 2]``, the prediction as a sentence (``"predictions"``), or None."""
        if return_type not in (None, "logits", "predictions"):
            raise ValueError(f"return_type must be 'logits', 'predictions' or None, got {return_type!r}")
        if isinstance(input, list):
            tokens, token_type_ids, one_zero_attention_mask = self.to_tokens(input)
        else:
            if token_type_ids is None:
                raise ValueError("You are using the NSP task without specifying token_type_ids: pass them "
                                 "with token ids, or give the two sentences as a list of strings")
            tokens = input
        for part in ("pooler", "nsp_head"):
            if not hasattr(self.model, part):
                raise ValueError(f"the encoder has no {part}: hooked_attn's BERT loader builds the masked-LM "
                                 "model only; set model.pooler and model.nsp_head to run next-sentence prediction")
        resid = self.model.encoder_output(tokens, token_type_ids, one_zero_attention_mask)
        logits = self.model.nsp_head(self.model.pooler(resid))
        if return_type is None:
            return None
        if return_type == "predictions":
            return PREDICTIONS[int(torch.as_tensor(logits).argmax(dim=-1)[0])]
        return logits

    def run_with_cache(self, *model_args: Any, return_cache_object: bool = True, remove_batch_dim: bool = False,
                       **kwargs: Any) -> tuple[Any, Any]:
        """The model's ``run_with_cache`` with this NSP forward; the model's own forward is restored after."""
        saved = self.model.__dict__.get("forward", None)
        self.model.forward = self.forward
        try:
            out, cache = self.model.run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        finally:
            if saved is None:
                del self.model.forward
            else:
                self.model.forward = saved
        if not return_cache_object:
            return out, dict(cache.cache_dict if isinstance(cache, _BaseCache) else cache)
        entries = cache.cache_dict if isinstance(cache, _BaseCache) else dict(cache)
        if not isinstance(cache, (_BaseCache, Mapping)):
            raise TypeError(f"the model's run_with_cache returned a {type(cache).__name__}, not a cache")
        return out, ActivationCache(entries, self, has_batch_dim=not remove_batch_dim)  # type: ignore[arg-type]


__all__ = ["BertNextSentencePrediction"]
