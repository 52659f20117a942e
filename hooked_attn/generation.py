"""Text generation with a key/value cache: ``GenerationMixin.generate``; hooks attached to the model fire on every step.

``generate`` is split in two: ``_generation_inputs`` checks every argument and turns the input into
left-packed token ids and a mask (nothing runs before it has passed), and ``_generate_tokens`` is the loop.
"""

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_attn.components.kv_cache import KVCache
from hooked_attn.config import LearnedPositions, ShortformerPositions
from hooked_attn.tokens import PADDING_MASK_ATTR

# The mixin's methods run on a HookedTransformer (model.py mixes it in); they name it ``Any`` rather than
# import model.py, which imports this module.
GenerateReturn = Literal["input", "str", "tokens"]
_RETURN_TYPES = ("input", "str", "tokens")


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sample_next(
    logits: Float[Tensor, "batch d_vocab"], do_sample: bool, temperature: float | int, top_k: int | None,
    top_p: float | int | None, generator: torch.Generator | None = None,
) -> Int[Tensor, " batch"]:
    """The next token of each row: the argmax, or a sample after temperature, top-k and top-p filtering."""
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def check_sampling_options(do_sample: bool, temperature: float | int, top_k: int | None,
                           top_p: float | int | None) -> None:
    """Refuse sampling options that would be ignored or are out of range.

    Without ``do_sample`` the output is greedy, so a ``temperature`` other than 1.0 (or 0.0, which
    means greedy), a ``top_k`` or a ``top_p`` would be silently ignored: refused, unlike HF (which
    warns) and TransformerLens (which samples by default).
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or math.isnan(temperature):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 (1 is greedy) or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if not do_sample:
        ignored = [f"{name}={value!r}" for name, value, default in
                   (("temperature", temperature, (1.0, 0.0)), ("top_k", top_k, (None,)), ("top_p", top_p, (None,)))
                   if value not in default]
        if ignored:
            raise ValueError(f"{', '.join(ignored)} only apply when sampling: pass do_sample=True "
                             "(generate is greedy by default, unlike TransformerLens)")


def pack_left(tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"]
              ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Move each row's real tokens (mask 1) to the end of the row, in order, padding on the left.

    Generation appends after the last position, so a right-padded row would continue from a pad;
    positions count real tokens only, so the packed row runs exactly as it did.
    """
    real = mask.bool()
    # A stable sort on "is real" puts the padding first and keeps each group's order.
    order = real.long().argsort(dim=1, stable=True)
    return tokens.gather(1, order), real.gather(1, order).to(mask.dtype)


@dataclass(frozen=True)
class _GenerationInputs:
    tokens: Tensor
    mask: Tensor | None
    eos: Tensor
    text_input: bool
    single_string: bool


class GenerationMixin:
    """``generate``: continue a prompt token by token through the model's ordinary forward pass."""

    @torch.no_grad()
    def generate(
        self, input: str | list[str] | Tensor, max_new_tokens: int = 10, do_sample: bool = False,
        temperature: float | int = 1.0, top_k: int | None = None, top_p: float | int | None = None,
        stop_at_eos: bool = True, eos_token_id: int | list[int] | None = None, use_past_kv_cache: bool = True,
        prepend_bos: bool | None = None, attention_mask: Tensor | None = None,
        return_type: GenerateReturn = "input", return_cache: bool = False, generator: torch.Generator | None = None,
    ) -> Any:
        """Continue ``input`` by up to ``max_new_tokens`` tokens (greedy unless ``do_sample``).

        Args:
            input: a string, a list of strings (left-padded into one batch) or token ids ``[batch pos]``
                (with ``attention_mask`` if they are padded, on either side: each row's real tokens are
                packed to its end, so the returned ids are left-padded).
            do_sample: sample (with ``temperature``, ``top_k``, ``top_p``) instead of taking the argmax.
                Without it, a ``temperature`` other than 1.0 or 0.0, a ``top_k`` or a ``top_p`` is refused.
            temperature: divides the logits before sampling; 0 means greedy.
            stop_at_eos: stop a sequence at its end-of-sequence token (later positions are filled with
                it) and stop early once every sequence has ended.
            use_past_kv_cache: run each step on the new token only, reusing cached keys and values
                (a model with bidirectional attention always runs the whole sequence).
            return_type: ``"input"`` returns the type that came in; ``"str"`` strings; ``"tokens"`` ids.
            return_cache: also return an ActivationCache of one forward over the whole generated
                sequence (prompt and continuation), as ``(output, cache)``.

        Hooks attached to the model (``with model.hooks(...)``) fire on every step; with the KV cache a
        step's activations cover the new position only.
        """
        inputs = self._generation_inputs(input, max_new_tokens, do_sample, temperature, top_k, top_p, stop_at_eos,
                                         eos_token_id, prepend_bos, attention_mask, return_type)
        tokens, mask = self._generate_tokens(inputs, max_new_tokens, do_sample, temperature, top_k, top_p,
                                             stop_at_eos, use_past_kv_cache, generator)
        if return_type == "tokens" or (return_type == "input" and not inputs.text_input):
            output: Any = tokens
        else:  # strings, each without its own padding
            rows = list(tokens) if mask is None else [row[m.bool()] for row, m in zip(tokens, mask)]
            texts = [self.to_string(row) for row in rows]  # type: ignore[attr-defined]
            output = texts[0] if inputs.single_string else texts
        if return_cache:
            _, act_cache = self.run_with_cache(tokens, attention_mask=mask)  # type: ignore[attr-defined]
            return output, act_cache
        return output

    def _generation_inputs(
        self, input: Any, max_new_tokens: int, do_sample: bool, temperature: float | int, top_k: int | None,
        top_p: float | int | None, stop_at_eos: bool, eos_token_id: int | list[int] | None,
        prepend_bos: bool | None, attention_mask: Tensor | None, return_type: Any,
    ) -> _GenerationInputs:
        """Every argument checked, and the prompt as left-packed ids and mask on the model's device."""
        model: Any = self
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if return_type not in _RETURN_TYPES:
            raise ValueError(f"return_type must be one of {_RETURN_TYPES}, got {return_type!r}")
        check_sampling_options(do_sample, temperature, top_k, top_p)
        if isinstance(input, (str, list)):
            if attention_mask is not None:
                raise ValueError("attention_mask is for token-id input; text is tokenized and masked here")
            tokens, mask = model.tokenize(input, prepend_bos=prepend_bos, padding_side="left")
        elif isinstance(input, Tensor):
            tokens = input.to(model.device)
            if tokens.ndim == 1:
                tokens = tokens[None]
            if tokens.ndim != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
                raise ValueError(f"expected token ids [batch pos] or [pos], got {tokens.dtype} {tuple(input.shape)}")
            if tokens.shape[1] == 0:
                raise ValueError("the prompt has no positions: generation needs at least one token")
            if attention_mask is None:  # ids that to_tokens padded carry their mask
                attention_mask = getattr(input, PADDING_MASK_ATTR, None)
            elif attention_mask.ndim == 1 and input.ndim == 1:  # one prompt [pos] and its mask [pos]
                attention_mask = attention_mask[None]
            mask = None if attention_mask is None else model._check_attention_mask(attention_mask, tokens.shape)
            if mask is not None:
                if not bool(mask.any(dim=1).all()):
                    empty = (~mask.bool().any(dim=1)).nonzero()[:, 0].tolist()
                    raise ValueError(f"attention_mask rows {empty} have no real token: nothing to continue from")
                tokens, mask = pack_left(tokens, mask.to(model.device))
        else:
            raise TypeError(f"generate takes a string, a list of strings or token ids, got {type(input).__name__}")
        model._check_token_ids(tokens)
        if eos_token_id is None and stop_at_eos:
            eos_token_id = model.tokenizer.eos_token_id if model.tokenizer is not None else None
            if eos_token_id is None:
                raise ValueError("stop_at_eos=True needs an eos_token_id (the model has no tokenizer to take it from)")
        if not (eos_token_id is None or _is_id(eos_token_id)
                or isinstance(eos_token_id, (list, tuple)) and all(map(_is_id, eos_token_id))):
            raise ValueError(f"eos_token_id must be an int, a list of ints or None, got {eos_token_id!r}")
        learned = isinstance(model.cfg.positions, (LearnedPositions, ShortformerPositions))
        n_ctx = model.cfg.positions.n_ctx if learned else None
        n_prompt = tokens.shape[1] if mask is None else int(mask.sum(-1).max())
        if n_ctx is not None and n_prompt + max_new_tokens > n_ctx:
            raise ValueError(f"the prompt has {n_prompt} tokens and the model's learned positions stop at "
                             f"n_ctx={n_ctx}: max_new_tokens={max_new_tokens} would run past them (at most "
                             f"{max(n_ctx - n_prompt, 0)} fit)")
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                           dtype=torch.long, device=tokens.device)
        if eos.numel() and (int(eos.min()) < 0 or int(eos.max()) >= model.cfg.d_vocab):
            raise ValueError(f"eos_token_id {eos.tolist()} is outside the vocabulary 0..{model.cfg.d_vocab - 1}")
        return _GenerationInputs(tokens, mask, eos, isinstance(input, (str, list)), isinstance(input, str))

    def _generate_tokens(
        self, inputs: _GenerationInputs, max_new_tokens: int, do_sample: bool, temperature: float | int,
        top_k: int | None, top_p: float | int | None, stop_at_eos: bool, use_past_kv_cache: bool,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor | None]:
        """The loop: one forward per new token (the new position only, with the KV cache)."""
        model: Any = self
        tokens, mask, eos = inputs.tokens, inputs.mask, inputs.eos
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        # Bidirectional attention: a new token changes the cached keys, so every step runs the whole sequence.
        cache = KVCache.empty(model.cfg.n_layers) if use_past_kv_cache and model.cfg.causal else None
        step_input, step_mask = tokens, mask
        for _ in range(max_new_tokens):
            if cache is not None:
                logits = model(step_input, attention_mask=step_mask, past_kv_cache=cache)
            else:
                logits = model(tokens, attention_mask=mask)
            next_token = sample_next(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
            if stop_at_eos and eos.numel():
                next_token = torch.where(finished, eos[0], next_token)
                finished |= torch.isin(next_token, eos)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_input, step_mask = next_token[:, None], None
            if stop_at_eos and bool(finished.all()):
                break
        return tokens, mask


def generate(model: Any, input: str | list[str] | Tensor, max_new_tokens: int = 10,
             **kwargs: Any) -> Any:
    """``model.generate(input, max_new_tokens, **kwargs)``, kept for callers of the function form."""
    return model.generate(input, max_new_tokens, **kwargs)
