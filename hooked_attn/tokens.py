"""Tokenizer helpers of HookedTransformer: strings to tokens and back, with TransformerLens' names."""

from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

PaddingSide = Literal["left", "right"]
# to_tokens sets this attribute on ids it padded: the model reads it when no attention_mask is given.
PADDING_MASK_ATTR = "hooked_attn_padding_mask"


def check_attention_mask(mask: object, shape: tuple[int, ...], device: torch.device,
                         allow_empty_rows: bool = False) -> Int[Tensor, "batch pos"]:
    """An attention mask as 0/1 integers on ``device``, or a ValueError naming what is wrong.

    Accepts bool, integer or floating 0/1 masks (1 = real token). An additive float mask (0 = keep,
    large negative = pad, as HF builds internally) would read inverted, so it is refused with the fix.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"attention_mask must be a tensor [batch pos] of 0/1, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, but the input is {tuple(shape)}")
    if mask.dtype != torch.bool and mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        if mask.is_floating_point() and bool((mask <= 0).all()):
            raise ValueError("attention_mask holds 0 and negative values: it looks like an additive mask "
                             "(0 = keep, large negative = padding). Pass 1 for real tokens and 0 for padding, "
                             "e.g. attention_mask=(mask == 0).long()")
        raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (real token), got values "
                         f"{mask.unique()[:8].tolist()}")
    mask = mask.to(device=device, dtype=torch.long)
    if not allow_empty_rows and mask.numel() and not bool(mask.any(-1).all()):
        empty = (~mask.bool().any(-1)).nonzero()[:, 0].tolist()
        raise ValueError(f"attention_mask rows {empty} have no real token (all 0); every sequence needs at least one")
    return mask


class TokenizerMixin:
    """``to_tokens``, ``to_str_tokens``, ``to_string``, ``to_single_token``, ``get_token_position``.

    By default text is tokenized the way the model's own tokenizer does it (``add_special_tokens``):
    a BOS token is added exactly when the tokenizer adds one. ``prepend_bos=True`` adds one where the
    tokenizer does not; ``prepend_bos=False`` removes the one it adds.
    """

    tokenizer: PreTrainedTokenizerBase | None
    default_padding_side: PaddingSide = "right"
    default_prepend_bos: bool | None = None  # what prepend_bos=None means; None: as the tokenizer does

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer: pass tokenizer= to from_pretrained, or set model.tokenizer"
            )
        return self.tokenizer

    def _tokenize(
        self, text: str | list[str], prepend_bos: bool | None, padding_side: PaddingSide | None,
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        tok = self._require_tokenizer()
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left', 'right' or None, got {padding_side!r}")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("expected a string or a non-empty list of strings to tokenize")
        ids = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
        bos = tok.bos_token_id
        prepend_bos = self.default_prepend_bos if prepend_bos is None else prepend_bos
        if prepend_bos is True:
            if bos is None:
                raise ValueError("prepend_bos=True, but this tokenizer has no BOS token")
            ids = [row if row[:1] == [bos] else [bos, *row] for row in ids]
        elif prepend_bos is False and bos is not None:
            ids = [row[1:] if row[:1] == [bos] else row for row in ids]
        if any(len(row) == 0 for row in ids):
            raise ValueError("an input tokenized to no tokens at all (empty string?); the model needs at least one")
        width = max(len(row) for row in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        side = padding_side or self.default_padding_side
        tokens = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            tokens[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return tokens, mask

    def tokenize(
        self, input: str | list[str], prepend_bos: bool | None = None, padding_side: PaddingSide | None = None,
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """Token ids and the matching attention mask (1 = real token, 0 = padding), on the model's device.

        Pass both to the model (``model(tokens, attention_mask=mask)``) to run a padded batch
        exactly as each sequence would run alone.
        """
        tokens, mask = self._tokenize(input, prepend_bos, padding_side)
        return tokens.to(self.device), mask.to(self.device)  # type: ignore[attr-defined]

    def to_tokens(
        self, input: str | list[str], prepend_bos: bool | None = None, padding_side: PaddingSide | None = None,
        move_to_device: bool = True,
    ) -> Int[Tensor, "batch pos"]:
        """Token ids ``[batch pos]``; a list of strings is padded (right by default) to one length.

        Padded ids carry their padding mask (as the attribute ``hooked_attn_padding_mask``), which
        the model's forward and ``generate`` use when no ``attention_mask`` is passed, so
        ``model(model.to_tokens(prompts))`` never attends to padding. A tensor made from them
        (sliced, concatenated, copied) does not carry it: pass ``attention_mask=`` from
        ``model.tokenize`` then.
        """
        tokens, mask = self._tokenize(input, prepend_bos, padding_side)
        tokens = tokens.to(self.device) if move_to_device else tokens  # type: ignore[attr-defined]
        if not bool(mask.all()):
            setattr(tokens, PADDING_MASK_ATTR, mask.to(tokens.device))
        return tokens

    def to_str_tokens(
        self, input: str | list[str] | Tensor | list[int], prepend_bos: bool | None = None,
    ) -> list[str] | list[list[str]]:
        """Each token as its own string; a list of strings or a 2-D tensor gives a list per row."""
        tok = self._require_tokenizer()
        if isinstance(input, list) and input and isinstance(input[0], str):
            return [self.to_str_tokens(text, prepend_bos) for text in input]  # type: ignore[misc]
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos, move_to_device=False)[0].tolist()
        else:
            t = torch.as_tensor(input)
            self._check_decodable(t)
            if t.ndim == 0:
                t = t[None]
            if t.ndim == 2:
                if t.shape[0] != 1:
                    return [self.to_str_tokens(row) for row in t]  # type: ignore[misc]
                t = t[0]
            ids = t.tolist()
        return [tok.decode([i]) for i in ids]

    def to_string(self, tokens: Tensor | list[int]) -> str | list[str]:
        """Decode token ids; a 2-D tensor gives one string per row."""
        tok = self._require_tokenizer()
        t = torch.as_tensor(tokens)
        self._check_decodable(t)
        if t.ndim == 2:
            return [tok.decode(row.tolist()) for row in t]
        return tok.decode(t.tolist())

    def _check_decodable(self, ids: Tensor) -> None:
        """Token ids to decode: ints in the model's vocabulary (a tokenizer decodes ids past its own
        vocabulary as nothing at all, and a negative id overflows)."""
        if ids.ndim > 2 or ids.numel() and (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool):
            raise ValueError(f"expected token ids [pos] or [batch pos], got {ids.dtype} {tuple(ids.shape)}")
        d_vocab = getattr(getattr(self, "cfg", None), "d_vocab", None)
        if ids.numel() and d_vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= d_vocab):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(f"token id {bad} is out of range: the vocabulary has ids 0..{d_vocab - 1}")

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token.

        Raises:
            ValueError: the string is not a single token; the message shows how it splits.
        """
        tokens = self.to_tokens(string, prepend_bos=False, move_to_device=False)[0]
        if tokens.numel() != 1:
            pieces = self.to_str_tokens(tokens)
            raise ValueError(f"{string!r} is not a single token: it splits into {len(pieces)}: {pieces}")
        return int(tokens[0])

    def get_token_position(
        self, single_token: str | int, input: str | Tensor, mode: Literal["first", "last"] = "first",
        prepend_bos: bool | None = None,
    ) -> int:
        """The position of ``single_token`` in ``input`` (a string or a 1-row token tensor).

        Raises:
            ValueError: the token does not occur, or the input holds more than one sequence.
        """
        tokens = self.to_tokens(input, prepend_bos, move_to_device=False) if isinstance(input, str) else input
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"get_token_position needs one sequence, got a batch of {tokens.shape[0]}")
            tokens = tokens[0]
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        hits = (tokens.cpu() == token).nonzero()[:, 0]
        if hits.numel() == 0:
            raise ValueError(f"token {single_token!r} (id {token}) does not occur in the input")
        return int(hits[0] if mode == "first" else hits[-1])
