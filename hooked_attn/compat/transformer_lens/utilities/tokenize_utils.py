"""``transformer_lens.utilities.tokenize_utils``: BOS handling around an HF tokenizer."""

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor


def _require_bos(tokenizer: Any) -> None:
    if tokenizer.bos_token is None or tokenizer.bos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '')!r}) has no BOS token: "
                         "pass prepend_bos=False")


def get_input_with_manually_prepended_bos(tokenizer: Any, input: str | list[str]) -> str | list[str]:
    """The text with the tokenizer's BOS token string in front (each string of a list)."""
    _require_bos(tokenizer)
    if isinstance(input, str):
        return tokenizer.bos_token + input
    return [tokenizer.bos_token + text for text in input]


def get_tokens_with_bos_removed(tokenizer: Any, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos_minus_1"]:
    """The token ids without each row's leading BOS: the first column when padding is on the right,
    the first real (non-pad) position of each row when it is on the left."""
    _require_bos(tokenizer)
    if tokenizer.padding_side == "right" or tokenizer.pad_token_id is None:
        return tokens[..., 1:]
    is_pad = tokens == tokenizer.pad_token_id
    first_real = (~is_pad).long().argmax(-1)  # the BOS sits at each row's first non-pad position
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[torch.arange(tokens.shape[0]), first_real] = False
    return tokens[keep].reshape(tokens.shape[0], tokens.shape[1] - 1)


def get_tokenizer_with_bos(tokenizer: Any) -> Any:
    """A tokenizer that adds a BOS token: ``tokenizer`` itself when its ``add_bos_token`` is on,
    else the same tokenizer reloaded (``AutoTokenizer.from_pretrained(name_or_path, add_bos_token=True)``)
    with its ``padding_side`` kept."""
    if getattr(tokenizer, "add_bos_token", False):
        return tokenizer
    from transformers import AutoTokenizer

    name = getattr(tokenizer, "name_or_path", None)
    if not name:
        raise ValueError(f"{type(tokenizer).__name__} has no name_or_path to reload it with add_bos_token=True")
    reloaded = AutoTokenizer.from_pretrained(name, add_bos_token=True)
    reloaded.padding_side = tokenizer.padding_side
    return reloaded


__all__ = ["get_input_with_manually_prepended_bos", "get_tokenizer_with_bos", "get_tokens_with_bos_removed"]
