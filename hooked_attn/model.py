"""HookedTransformer: embed -> blocks -> final norm -> unembed, with a HookPoint at every activation."""

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from hooked_attn.cache import ActivationCache, CacheMemory, estimate_cache_memory
from hooked_attn.components.block import TransformerBlock
from hooked_attn.components.embed import Embed, PosEmbed
from hooked_attn.components.norms import Norm
from hooked_attn.components.attention import AttentionContext
from hooked_attn.components.kv_cache import KVCache
from hooked_attn.components.unembed import Unembed
from hooked_attn.config import LearnedPositions, ModelConfig, ShortformerPositions
from hooked_attn.hook_points import HookedRootModule, HookPoint, NamesFilter
from hooked_attn.generation import GenerationMixin
from hooked_attn.pretrained import DeviceMapArg, PretrainedMixin  # noqa: F401  (DeviceMapArg: re-exported)
from hooked_attn.saes.splice import SAESplicingMixin
from hooked_attn.sublayer_inputs import SublayerInputsMixin
from hooked_attn.tokens import PADDING_MASK_ATTR, PaddingSide, TokenizerMixin, check_attention_mask
from hooked_attn.utils import lm_cross_entropy_loss
from hooked_attn.weights import WeightsMixin

ReturnType = Literal["logits", "loss", "both"] | None
# Token ids [batch pos], text, or (with start_at_layer) a residual [batch pos d_model]. Left as a
# plain Tensor in the signature: forward validates shapes itself, with messages that name them.
ModelInput = str | list[str] | Tensor


_RETURN_TYPES = ("logits", "loss", "both", None)


@dataclass(frozen=True)
class _ForwardRun:
    """A forward's checked inputs: what ``_forward`` computes on."""

    input: Tensor
    tokens: Tensor | None
    attention_mask: Tensor | None  # over the new positions
    full_mask: Tensor | None  # over cached + new positions
    ctx: AttentionContext
    start: int | None
    stop: int | None


class HookedTransformer(PretrainedMixin, GenerationMixin, SAESplicingMixin, TokenizerMixin, SublayerInputsMixin,
                        WeightsMixin, HookedRootModule):
    """A decoder-only transformer rebuilt from its config, every activation a named HookPoint.

    Build one with ``HookedTransformer.from_pretrained(...)``; the constructor makes an
    uninitialised model of the given config.
    """

    def __init__(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()
        if cfg.embed_norm is not None:
            self.embed_ln = Norm(cfg.embed_norm, cfg.d_model)
        if isinstance(cfg.positions, (LearnedPositions, ShortformerPositions)):
            self.pos_embed = PosEmbed(cfg, cfg.positions.n_ctx)
            self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList(TransformerBlock(cfg, layer) for layer in range(cfg.n_layers))
        if cfg.final_norm:
            self.ln_final = Norm(cfg.norm, cfg.d_model)
        self.unembed = Unembed(cfg)
        self.setup()

    @property
    def device(self) -> torch.device:
        # Spread over devices (hooked_attn.scale.dispatch), the input goes where the first unit runs.
        return getattr(self, "_dispatched_device", None) or self.embed.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.W_E.dtype

    def forward(
        self, input: ModelInput, return_type: ReturnType = "logits", loss_per_token: bool = False,
        attention_mask: Tensor | None = None, prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None, start_at_layer: int | None = None,
        stop_at_layer: int | None = None, tokens: Int[Tensor, "batch pos"] | None = None,
        past_kv_cache: KVCache | None = None, shortformer_pos_embed: Float[Tensor, "batch pos d_model"] | None = None,
    ) -> Any:
        """Run the model.

        Args:
            input: token ids ``[batch pos]``, a string, or a list of strings (tokenized, padded, and
                masked automatically); with ``start_at_layer``, the residual stream entering that block.
                Ids that ``to_tokens`` padded carry their padding mask, used when no
                ``attention_mask`` is given.
            return_type: ``"logits"``, ``"loss"``, ``"both"`` (a ``(logits, loss)`` pair) or None.
            loss_per_token: return the loss at each position ``[batch pos-1]`` instead of the mean.
            attention_mask: 1 for real tokens, 0 for padding (bool, int, or float 0./1.; an additive
                mask of 0 and large negatives is refused, naming the fix). Padding is never attended
                to, and positions count real tokens only, so a left-padded sequence sees the
                positions it would alone. Given with text, it must match the tokenized shape and can
                only hide more tokens. Shapes that disagree with the input (or with a
                ``past_kv_cache``'s batch, or ``tokens``') raise a ValueError before anything runs.
            start_at_layer: run from this block on; ``input`` is then its ``resid_pre``.
            stop_at_layer: stop before this block and return the residual stream entering it.
                Both may be negative (counted from the end, as in Python); an empty range is refused.
            tokens: the token ids, needed for the loss when starting mid-model.
            past_kv_cache: a ``KVCache`` (``KVCache.empty(n_layers)`` to start): the input holds only
                the new positions; their keys and values are appended to it. ``attention_mask``
                then covers the new positions only (the cache remembers the earlier ones). A call
                that fails leaves the cache as it was.
                The loss (``return_type="loss"``/``"both"``) then scores only the pairs inside the
                new positions: not the boundary pair (last cached token -> first new token), whose
                logits came from the previous call (docs/generation.md, "The loss over a cached chunk").
            shortformer_pos_embed: with ``start_at_layer`` on a model with ``ShortformerPositions``, the
                position embedding each attention layer adds to its query and key inputs (what
                ``hook_pos_embed`` held); by default it is computed from the positions.
        """
        run = self._forward_inputs(input, return_type, attention_mask, prepend_bos, padding_side, start_at_layer,
                                   stop_at_layer, tokens, past_kv_cache, shortformer_pos_embed)
        if past_kv_cache is None:
            return self._forward(run, return_type, loss_per_token)
        # A forward that stops early reads the cache and leaves it as it was: not every layer has run.
        with past_kv_cache.step(run.full_mask, run.input.shape[1], commit=run.stop is None):
            return self._forward(run, return_type, loss_per_token)

    def _forward_inputs(
        self, input: ModelInput, return_type: Any, attention_mask: Tensor | None, prepend_bos: bool | None,
        padding_side: PaddingSide | None, start_at_layer: int | None, stop_at_layer: int | None,
        tokens: Tensor | None, past_kv_cache: KVCache | None, shortformer_pos_embed: Tensor | None = None,
    ) -> "_ForwardRun":
        """Every argument checked, before anything runs or changes."""
        if return_type not in _RETURN_TYPES:
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        start, stop = self._layer_range(start_at_layer, stop_at_layer)
        if past_kv_cache is not None and not isinstance(past_kv_cache, KVCache):
            raise TypeError(f"past_kv_cache must be a KVCache (KVCache.empty(n_layers)), got {type(past_kv_cache).__name__}")
        if past_kv_cache is not None and not self.cfg.causal:
            raise ValueError("past_kv_cache needs causal attention: this model attends both ways, so every new token "
                             "would change the keys and values already cached; run the whole sequence instead")
        if past_kv_cache is not None and start_at_layer is not None:
            raise ValueError("past_kv_cache needs every layer from block 0 on to run: it cannot be combined with "
                             "start_at_layer")
        if isinstance(input, (str, list)):
            input, attention_mask = self._text_to_tokens(input, attention_mask, prepend_bos, padding_side)
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be token ids, text or (with start_at_layer) a residual, got {type(input).__name__}")
        if attention_mask is None and start_at_layer is None:
            attention_mask = getattr(input, PADDING_MASK_ATTR, None)  # ids that to_tokens padded
        if start_at_layer is None:
            if input.dtype.is_floating_point:
                raise ValueError(f"expected token ids, got a {input.dtype} tensor (residuals need start_at_layer)")
            if input.ndim != 2:
                raise ValueError(f"expected token ids of shape [batch pos], got shape {tuple(input.shape)}")
            if tokens is not None and tokens.shape != input.shape:
                raise ValueError(f"tokens has shape {tuple(tokens.shape)}, but the input is {tuple(input.shape)}")
            if tokens is not None and not torch.equal(tokens.to(input.device), input):
                raise ValueError("tokens differ from the token ids given as input: tokens= is for start_at_layer "
                                 "(a residual input); with ids as input the loss is taken on them")
            if input.dtype not in (torch.int64, torch.int32, torch.bool) and not input.dtype.is_complex:
                input = input.long()  # uint8/int16 ids: F.embedding takes int32 and int64 only
            tokens = input  # ids out of range are refused by Embed, before any hook fires
        elif input.ndim != 3 or input.shape[-1] != self.cfg.d_model:
            raise ValueError(
                f"with start_at_layer, input must be a residual [batch pos d_model={self.cfg.d_model}], "
                f"got shape {tuple(input.shape)}"
            )
        elif input.dtype != self.dtype and not torch.is_autocast_enabled(input.device.type):
            raise ValueError(f"with start_at_layer, the residual must have the model's dtype {self.dtype}, got "
                             f"{input.dtype}: pass resid.to({self.dtype})")
        if input.shape[1] == 0:
            raise ValueError("the input has no positions: a sequence needs at least one token")
        if attention_mask is not None:
            attention_mask = self._check_attention_mask(attention_mask, input.shape[:2], cached=past_kv_cache)
        if tokens is not None and tokens.shape != input.shape[:2]:
            raise ValueError(f"tokens has shape {tuple(tokens.shape)}, but the input is {tuple(input.shape[:2])}")
        if return_type in ("loss", "both") and stop is not None:
            raise ValueError(f"return_type={return_type!r} needs the logits, but stop_at_layer={stop_at_layer} returns "
                             "the residual stream entering that block")
        if return_type in ("loss", "both") and tokens is None:
            raise ValueError(f"return_type={return_type!r} needs the token ids: pass tokens=")
        full_mask, n_cached = attention_mask, 0
        if past_kv_cache is not None:
            ungrouped = any(block.attn.ungroup_grouped_query_attention for block in self.blocks)  # K/V per query head
            kv_heads = self.cfg.n_heads if ungrouped else self.cfg.n_kv_heads
            past_kv_cache.check_fits(self.cfg.n_layers, tuple(input.shape[:2]), (kv_heads, self.cfg.d_head))
            n_cached = past_kv_cache.n_cached
            # A row may still be all padding here (a chunked prefill of a left-padded batch).
            full_mask = past_kv_cache.mask_with(attention_mask, input.shape[1], input.shape[0], input.device)
        learned = isinstance(self.cfg.positions, LearnedPositions) and start_at_layer is None
        shortformer = isinstance(self.cfg.positions, ShortformerPositions)
        self._check_shortformer_pos_embed(shortformer_pos_embed, start_at_layer, tuple(input.shape[:2]))
        if (learned or shortformer) and shortformer_pos_embed is None:
            n_real = n_cached + input.shape[1] if full_mask is None else int(full_mask.bool().sum(-1).max())
            if n_real > self.cfg.positions.n_ctx:
                raise ValueError(f"position {n_real - 1} is past the model's n_ctx={self.cfg.positions.n_ctx} "
                                 f"learned positions; use at most {self.cfg.positions.n_ctx} tokens")
        ctx = AttentionContext.build(input.shape[0], input.shape[1], input.device, full_mask, causal=self.cfg.causal,
                                     n_cached=n_cached, kv_cache=past_kv_cache)
        ctx.query_key_pos = shortformer_pos_embed
        return _ForwardRun(input, tokens, attention_mask, full_mask, ctx, start, stop)

    def _forward(self, run: "_ForwardRun", return_type: ReturnType, loss_per_token: bool) -> Any:
        """The computation, on inputs ``_forward_inputs`` has checked."""
        input, ctx = run.input, run.ctx
        if run.start is None:
            embed = self.embed(input)
            if self.cfg.embed_scale is not None:  # HF multiplies in the activation dtype (Gemma)
                embed = embed * torch.tensor(self.cfg.embed_scale, dtype=embed.dtype)
            resid = self.hook_embed(embed)
            if self.cfg.embed_norm is not None:
                resid = self.embed_ln(resid)
            if isinstance(self.cfg.positions, LearnedPositions):
                resid = resid + self.hook_pos_embed(self.pos_embed(ctx.positions))
            elif isinstance(self.cfg.positions, ShortformerPositions):  # to queries and keys only
                ctx.query_key_pos = self.hook_pos_embed(self.pos_embed(ctx.positions))
        else:
            resid = input
            if isinstance(self.cfg.positions, ShortformerPositions) and ctx.query_key_pos is None:
                ctx.query_key_pos = self.pos_embed(ctx.positions)  # the embedding stage (and its hook) is skipped
        for block in self.blocks[run.start:run.stop]:
            resid = block(resid, ctx)
        if run.stop is not None:
            return resid
        logits = self.unembed(self.ln_final(resid) if self.cfg.final_norm else resid)
        cap = self.cfg.output_logits_soft_cap  # a TransformerLens config spells "none" as -1.0
        if cap is not None and cap > 0:
            logits = torch.tanh(logits / cap) * cap
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        assert run.tokens is not None  # checked in _forward_inputs
        # The logits may be on another device than the input (a device map).
        mask = None if run.attention_mask is None else run.attention_mask.to(logits.device)
        loss = lm_cross_entropy_loss(logits, run.tokens.to(logits.device), mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def _layer_range(self, start_at_layer: int | None, stop_at_layer: int | None) -> tuple[int | None, int | None]:
        """``start_at_layer``/``stop_at_layer`` as non-negative block indices; out of range or empty is refused."""
        n = self.cfg.n_layers
        out = []
        for name, value in (("start_at_layer", start_at_layer), ("stop_at_layer", stop_at_layer)):
            if value is None:
                out.append(None)
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not -n <= value <= n:
                raise ValueError(f"{name} must be an int in {-n}..{n} (the model has {n} layers), got {value!r}")
            out.append(value % n if value < 0 else value)
        start, stop = out
        if stop is not None and (start or 0) >= stop and not (start is None and stop == 0):
            raise ValueError(f"start_at_layer={start_at_layer}, stop_at_layer={stop_at_layer} select no block: "
                             "the range is empty")
        return start, stop

    def _check_shortformer_pos_embed(self, pos: Tensor | None, start_at_layer: int | None,
                                     shape: tuple[int, int]) -> None:
        if pos is None:
            return
        if not isinstance(self.cfg.positions, ShortformerPositions):
            raise ValueError("shortformer_pos_embed is for models with shortformer positions; this one's are "
                             f"{type(self.cfg.positions).__name__ if self.cfg.positions else 'absent'}")
        if start_at_layer is None:
            raise ValueError("shortformer_pos_embed goes with start_at_layer; from the tokens the model computes it")
        if not isinstance(pos, Tensor) or tuple(pos.shape) != (*shape, self.cfg.d_model):
            got = tuple(pos.shape) if isinstance(pos, Tensor) else type(pos).__name__
            raise ValueError(f"shortformer_pos_embed must be [batch pos d_model] = {(*shape, self.cfg.d_model)}, "
                             f"got {got}")

    def _check_token_ids(self, tokens: Tensor) -> None:
        if tokens.dtype == torch.bool or tokens.dtype.is_floating_point or tokens.dtype.is_complex:
            raise ValueError(f"token ids must be integers, got dtype {tokens.dtype}")
        if tokens.numel() and not torch.compiler.is_compiling():
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.cfg.d_vocab:
                bad = low if low < 0 else high
                raise ValueError(f"token id {bad} is out of range: the vocabulary has ids 0..{self.cfg.d_vocab - 1}")

    def _check_attention_mask(self, mask: Tensor, shape: tuple[int, ...] | torch.Size,
                              cached: KVCache | None = None) -> Tensor:
        """The mask as 0/1 ids on the model's device, or a ValueError naming what is wrong with it."""
        return check_attention_mask(mask, tuple(shape), self.device, allow_empty_rows=cached is not None)

    def cache_memory(
        self, input: ModelInput, names_filter: NamesFilter = None, *, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None, remove_batch_dim: bool = False, **forward_kwargs: Any,
    ) -> CacheMemory:
        """What ``run_with_cache(input, names_filter, ...)`` would store, without running it in full:
        each entry's shape and dtype and the bytes in all, from runs on the first 2 and 3 positions.

        Forward activations only (not the ``incl_bwd`` gradients). A ``past_kv_cache`` is copied,
        never extended.
        """
        if isinstance(input, (str, list)):
            input, forward_kwargs["attention_mask"] = self._text_to_tokens(
                input, forward_kwargs.get("attention_mask"), forward_kwargs.pop("prepend_bos", None),
                forward_kwargs.pop("padding_side", None))

        def run(n_pos: int) -> ActivationCache:
            prefix = {k: v[:, :n_pos] if k in ("attention_mask", "tokens") and v is not None else copy.deepcopy(v)
                      for k, v in forward_kwargs.items()}
            if prefix.get("attention_mask") is not None:  # shapes do not depend on it; a left-padded
                prefix["attention_mask"] = torch.ones_like(prefix["attention_mask"])  # prefix is all padding
            with torch.no_grad():
                _, cache = self.run_with_cache(input[:, :n_pos], names_filter=names_filter, device=device,
                                               dtype=dtype, remove_batch_dim=remove_batch_dim, **prefix)
            return cache

        return estimate_cache_memory(run, input.shape[1])

    def _text_to_tokens(
        self, text: str | list[str], attention_mask: Tensor | None, prepend_bos: bool | None,
        padding_side: PaddingSide | None,
    ) -> tuple[Tensor, Tensor]:
        """Token ids and mask for text; a mask given with the text can only hide more tokens."""
        tokens, text_mask = self.tokenize(text, prepend_bos, padding_side)
        if attention_mask is None:
            return tokens, text_mask
        if attention_mask.shape != text_mask.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, but the text tokenizes to "
                             f"{tuple(text_mask.shape)} [batch pos]")
        return tokens, text_mask * attention_mask.to(text_mask)

    def __repr__(self) -> str:
        c = self.cfg
        return (f"HookedTransformer({c.hf_architecture}: {c.n_layers} layers, d_model={c.d_model}, "
                f"{c.n_heads} heads / {c.n_kv_heads} kv heads, d_vocab={c.d_vocab}, {len(self.hook_dict)} hook points)")
