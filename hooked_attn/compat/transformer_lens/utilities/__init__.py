"""``transformer_lens.utilities`` (also ``transformer_lens.utils``): TransformerLens' helper names over hooked_attn."""

import importlib.util
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from hooked_attn.compat.transformer_lens.utilities.logits_utils import sample_logits
from hooked_attn.compat.transformer_lens.utilities.tensors import filter_dict_by_prefix, to_numpy
from hooked_attn.compat.transformer_lens.utilities.lm_utils import lm_accuracy, lm_cross_entropy_loss
from hooked_attn.compat.transformer_lens.utilities.tokenize_utils import get_tokens_with_bos_removed
from hooked_attn.utils import get_act_name, get_device

SliceInput = int | tuple | list | Tensor | np.ndarray | slice | None


class Slice:
    """One way to select along an axis: an int (drops the axis), a ``(start, stop[, step])`` tuple,
    a list/array/tensor of indices, a slice, or None (everything)."""

    def __init__(self, input_slice: "SliceInput | Slice" = None) -> None:
        if isinstance(input_slice, Slice):
            input_slice = input_slice.slice
        if isinstance(input_slice, tuple):
            self.slice: Any = slice(*input_slice)
            self.mode = "slice"
        elif isinstance(input_slice, int):
            self.slice, self.mode = input_slice, "int"
        elif isinstance(input_slice, Tensor) and input_slice.ndim == 0:
            self.slice, self.mode = int(input_slice), "int"
        elif isinstance(input_slice, slice):
            self.slice, self.mode = input_slice, "slice"
        elif isinstance(input_slice, (list, Tensor, np.ndarray)):
            self.slice, self.mode = torch.as_tensor(np.asarray(input_slice)), "array"
        elif input_slice is None:
            self.slice, self.mode = slice(None), "identity"
        else:
            raise ValueError(f"cannot make a Slice from {type(input_slice).__name__}: {input_slice!r}")

    def apply(self, tensor: Tensor, dim: int = 0) -> Tensor:
        index: list[Any] = [slice(None)] * tensor.ndim
        index[dim] = self.slice
        return tensor[tuple(index)]

    def indices(self, max_ctx: int | None = None) -> np.ndarray:
        """The selected indices of an axis of length ``max_ctx`` (needed unless the Slice is an int)."""
        if self.mode == "int":
            return np.array(self.slice)
        if max_ctx is None:
            raise ValueError("max_ctx is needed to list the indices of a slice or index list")
        return np.arange(max_ctx)[np.asarray(self.slice) if self.mode == "array" else self.slice]

    def __repr__(self) -> str:
        return f"Slice({self.slice!r})"

    @classmethod
    def unwrap(cls, slice_input: "SliceInput | Slice") -> "Slice":
        return slice_input if isinstance(slice_input, Slice) else cls(slice_input)


def remove_batch_dim(tensor: Tensor) -> Tensor:
    return tensor[0] if tensor.shape[0] == 1 else tensor


def transpose(tensor: Tensor) -> Tensor:
    """Swap the last two axes."""
    return tensor.transpose(-1, -2)


def is_square(x: Tensor) -> bool:
    return x.ndim == 2 and x.shape[0] == x.shape[1]


def is_lower_triangular(x: Tensor) -> bool:
    return is_square(x) and bool(x.equal(x.tril()))


USE_DEFAULT_VALUE = None  # the "not given" marker TransformerLens' signatures use for prepend_bos / padding_side


def override_or_use_default_value(default_flag: Any, override: Any = None) -> Any:
    return default_flag if override is None else override


def is_library_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def get_corner(tensor: Any, n: int = 3) -> Any:
    """The top-left ``n`` entries along every axis (a FactoredMatrix's corner from its factors)."""
    from hooked_attn.factored_matrix import FactoredMatrix

    if isinstance(tensor, FactoredMatrix):
        return tensor.get_corner(n)
    return tensor[tuple(slice(n) for _ in range(tensor.ndim))]


def gelu_new(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_fast(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def solu(x: Tensor) -> Tensor:
    """SoLU: ``x * softmax(x)`` over the last axis."""
    return x * x.softmax(-1)


def calc_fan_in_and_fan_out(tensor: Tensor) -> tuple[int, int]:
    """Fans of a weight: 1-D ``(1, n)``; 2-D ``(in, out)``; 3-D per-head ``[head in out]`` gives
    ``(in, head*out)``."""
    shape = tensor.shape
    if len(shape) == 1:
        return 1, shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3:
        return shape[1], shape[0] * shape[2]
    raise ValueError(f"fan in and fan out are defined for 1-, 2- and 3-D tensors, got shape {tuple(shape)}")


def _gain(nonlinearity: str) -> float:
    return math.sqrt(2.0) if nonlinearity == "relu" else 1.0


def init_xavier_uniform_(param: Tensor, gain: float = 1.0) -> Tensor:
    fan_in, fan_out = calc_fan_in_and_fan_out(param)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        return param.uniform_(-bound, bound)


def init_xavier_normal_(param: Tensor, gain: float = 1.0) -> Tensor:
    fan_in, fan_out = calc_fan_in_and_fan_out(param)
    with torch.no_grad():
        return param.normal_(0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)))


def _kaiming_std(param: Tensor, a: float, nonlinearity: str, gain: float, mode: str) -> float:
    fan_in, fan_out = calc_fan_in_and_fan_out(param)
    fan = fan_in if mode == "fan_in" else fan_out
    return gain * _gain(nonlinearity) / math.sqrt(fan * (1 + a * a) if nonlinearity == "leaky_relu" else fan)


def init_kaiming_uniform_(param: Tensor, a: float = 0, nonlinearity: str = "relu", gain: float = 1.0,
                          mode: str = "fan_in") -> Tensor:
    bound = math.sqrt(3.0) * _kaiming_std(param, a, nonlinearity, gain, mode)
    with torch.no_grad():
        return param.uniform_(-bound, bound)


def init_kaiming_normal_(param: Tensor, a: float = 0, nonlinearity: str = "relu", gain: float = 1.0,
                         mode: str = "fan_in") -> Tensor:
    with torch.no_grad():
        return param.normal_(0.0, _kaiming_std(param, a, nonlinearity, gain, mode))


def get_attention_mask(tokenizer: Any, tokens: Int[Tensor, "batch pos"], prepend_bos: bool) -> Tensor:
    """1 for real tokens, 0 for padding: pad tokens at the padded side (a leading BOS that equals
    the pad token counts as real when ``prepend_bos``)."""
    if tokenizer is None or tokenizer.pad_token_id is None:
        return torch.ones_like(tokens)
    is_pad = tokens == tokenizer.pad_token_id
    if tokenizer.padding_side == "right":
        real = (~is_pad).long().flip(-1).cummax(-1).values.flip(-1)  # up to the last real token
    else:
        real = (~is_pad).long().cummax(-1).values  # from the first real token
    if prepend_bos and tokenizer.bos_token_id == tokenizer.pad_token_id:
        if tokenizer.padding_side == "right":
            real[:, 0] = 1
        else:
            first = (~is_pad[:, 1:]).long().argmax(-1)  # the BOS sits just before the first real token
            real[torch.arange(tokens.shape[0]), first] = 1
    return real


def get_offset_position_ids(past_kv_pos_offset: int, attention_mask: Tensor) -> Tensor:
    """Positions that count real tokens only, shifted by the cached positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_kv_pos_offset:]


def clear_huggingface_cache() -> None:
    """Delete the HuggingFace hub cache folder (every downloaded model and dataset), as TransformerLens'
    acceptance tests do between models to save disk."""
    import shutil

    from huggingface_hub.constants import HF_HUB_CACHE

    shutil.rmtree(HF_HUB_CACHE, ignore_errors=True)


def tokenize_and_concatenate(dataset: Any, tokenizer: Any, streaming: bool = False, max_length: int = 1024,
                             column_name: str = "text", add_bos_token: bool = True, num_proc: int | None = 10,
                             set_format: bool = True) -> Any:
    """A ``datasets`` dataset of text turned into rows of ``max_length`` token ids (column ``tokens``).

    Each batch of documents is tokenized document by document (so no token is ever cut in two), joined
    with the EOS token, and cut into rows; with ``add_bos_token`` each row is BOS + ``max_length - 1``
    ids. The tokens left over at the end of a batch are dropped, unless the batch fills no row at all:
    then it gives one row, padded with the tokenizer's pad token (its EOS when it has none), so every id
    is in the vocabulary. ``set_format`` returns torch tensors; ``streaming`` (or an iterable dataset)
    maps lazily, without ``num_proc``.
    """
    if add_bos_token and tokenizer.bos_token_id is None:
        raise ValueError(f"add_bos_token=True, but {type(tokenizer).__name__} has no BOS token")
    per_row = max_length - 1 if add_bos_token else max_length
    if per_row < 1:
        raise ValueError(f"max_length={max_length} leaves no room for a token")
    sep = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sep

    def to_rows(batch: Any) -> dict[str, list[list[int]]]:  # a datasets LazyBatch (a mapping of columns)
        ids: list[int] = []
        for i, text in enumerate(batch[column_name]):
            if i and sep is not None:
                ids.append(sep)
            ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if not ids:
            return {"tokens": []}
        if len(ids) < per_row:
            if pad is None:
                raise ValueError(f"a batch of {len(ids)} tokens fills no row of {per_row} and the tokenizer has "
                                 "neither a pad nor an EOS token to pad it with")
            ids = ids + [pad] * (per_row - len(ids))
        rows = [ids[start:start + per_row] for start in range(0, len(ids) - per_row + 1, per_row)]
        if add_bos_token:
            rows = [[tokenizer.bos_token_id, *row] for row in rows]
        return {"tokens": rows}

    columns = list(dataset.column_names) if getattr(dataset, "column_names", None) else [column_name]
    lazy = streaming or not hasattr(dataset, "__len__")
    extra = {} if lazy or num_proc is None else {"num_proc": num_proc}
    out = dataset.map(to_rows, batched=True, remove_columns=columns, **extra)
    return out.with_format("torch") if set_format else out


__all__ = [
    "Slice", "clear_huggingface_cache", "tokenize_and_concatenate", "calc_fan_in_and_fan_out", "filter_dict_by_prefix", "gelu_fast", "gelu_new", "get_act_name", "get_attention_mask", "get_corner",
    "get_device", "get_offset_position_ids", "init_kaiming_normal_", "init_kaiming_uniform_",
    "init_xavier_normal_", "init_xavier_uniform_", "is_library_available", "is_lower_triangular", "is_square",
    "lm_accuracy", "lm_cross_entropy_loss", "override_or_use_default_value", "remove_batch_dim", "sample_logits",
    "solu", "to_numpy", "transpose", "USE_DEFAULT_VALUE", "get_tokens_with_bos_removed",
]
