"""Text generation with a key/value cache; hooks attached to the model fire on every step."""

from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_attn.components.kv_cache import KVCache

if TYPE_CHECKING:
    from hooked_attn.model import HookedTransformer

GenerateReturn = Literal["input", "str", "tokens"]


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


@torch.no_grad()
def generate(
    model: "HookedTransformer", input: str | list[str] | Tensor, max_new_tokens: int = 10, do_sample: bool = False,
    temperature: float | int = 1.0, top_k: int | None = None, top_p: float | int | None = None, stop_at_eos: bool = True,
    eos_token_id: int | list[int] | None = None, use_past_kv_cache: bool = True, prepend_bos: bool | None = None,
    attention_mask: Tensor | None = None, return_type: GenerateReturn = "input", return_cache: bool = False,
    generator: torch.Generator | None = None,
) -> Any:
    """Continue ``input`` by up to ``max_new_tokens`` tokens.

    Args:
        input: a string, a list of strings (left-padded into one batch) or token ids ``[batch pos]``
            (with ``attention_mask`` if they are padded).
        do_sample: sample (with ``temperature``, ``top_k``, ``top_p``) instead of taking the argmax.
        stop_at_eos: stop a sequence at its end-of-sequence token (later positions are filled with
            it) and stop early once every sequence has ended.
        use_past_kv_cache: run each step on the new token only, reusing cached keys and values.
        return_type: ``"input"`` returns the type that came in; ``"str"`` strings; ``"tokens"`` ids.
        return_cache: also return an ActivationCache of one forward over the whole generated
            sequence (prompt and continuation), as ``(output, cache)``.

    Hooks attached to the model (``with model.hooks(...)``) fire on every step; with the KV cache a
    step's activations cover the new position only.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if isinstance(input, (str, list)):
        tokens, mask = model.tokenize(input, prepend_bos=prepend_bos, padding_side="left")
    else:
        tokens = input.to(model.device)
        mask = None if attention_mask is None else attention_mask.to(model.device)
        if tokens.ndim == 1:
            tokens = tokens[None]
    if eos_token_id is None and stop_at_eos:
        eos_token_id = model.tokenizer.eos_token_id if model.tokenizer is not None else None
        if eos_token_id is None:
            raise ValueError("stop_at_eos=True needs an eos_token_id (the model has no tokenizer to take it from)")
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=tokens.device)
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    cache = KVCache.empty(model.cfg.n_layers) if use_past_kv_cache else None
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
    if return_type == "tokens" or (return_type == "input" and isinstance(input, Tensor)):
        output: Any = tokens
    else:  # strings, each without its own left padding
        rows = list(tokens) if mask is None else [row[m.bool()] for row, m in zip(tokens, mask)]
        texts = [model.to_string(row) for row in rows]
        output = texts[0] if isinstance(input, str) else texts
    if return_cache:
        _, act_cache = model.run_with_cache(tokens, attention_mask=mask)
        return output, act_cache
    return output
