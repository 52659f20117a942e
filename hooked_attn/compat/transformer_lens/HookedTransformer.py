"""TransformerLens' HookedTransformer: hooked_attn's model, built from a TransformerLens config and initialised as TL does.

``HookedTransformer(cfg)`` takes a ``HookedTransformerConfig`` (or its dict, or a hooked_attn
``ModelConfig``). ``model.cfg`` is then the TransformerLens config; the components read the
``ModelConfig`` it converts to (``model.model_cfg``).
"""

import dataclasses
import math
from typing import Any, NamedTuple, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn

from hooked_attn.compat.errors import CompatError
from hooked_attn.compat.transformer_lens.HookedTransformerConfig import HookedTransformerConfig
from hooked_attn.components.unembed import Unembed as _Unembed
from hooked_attn.config import ModelConfig, ShortformerPositions
from hooked_attn.hook_points import HookedRootModule  # noqa: F401  (TransformerLens users import it from here)
from hooked_attn.model import HookedTransformer as _Base

# The type names TransformerLens' HookedTransformer module exports (SAELens imports them from here).
SingleLoss = Float[Tensor, ""]
LossPerToken = Float[Tensor, "batch pos-1"]
Loss = Union[SingleLoss, LossPerToken]


# TransformerLens' state-dict names that differ from this model's (see HookedTransformer.load_state_dict).
_TL_KV_NAMES = {"_W_K": "W_K", "_W_V": "W_V", "_b_K": "b_K", "_b_V": "b_V"}
_TL_DERIVED_BUFFERS = ("IGNORE", "mask", "rotary_sin", "rotary_cos")


class Output(NamedTuple):
    """``(logits, loss)``, what ``forward(..., return_type="both")`` returns under TransformerLens' name."""

    logits: Float[Tensor, "batch pos d_vocab"]
    loss: Loss


DTYPE_FROM_STRING = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                     "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class _CompatConfig(HookedTransformerConfig):
    """A TransformerLens config that also answers ModelConfig's fields (for hooked_attn's own code)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        bound = self.__dict__.get("_model_cfg")
        if bound is None:
            raise AttributeError(name)
        return getattr(bound, name)


def _bind(cfg: HookedTransformerConfig) -> tuple[_CompatConfig, ModelConfig]:
    compat = cfg if isinstance(cfg, _CompatConfig) else _CompatConfig.__new__(_CompatConfig)
    if compat is not cfg:
        compat.__dict__.update(cfg.__dict__)
    model_cfg = compat.to_model_config()
    compat.__dict__["_model_cfg"] = model_cfg
    return compat, model_cfg


def _fans(name: str, shape: torch.Size) -> tuple[int, int]:
    """Fan-in and fan-out of a weight in the per-head layout: the input axis is d_model for
    W_Q/W_K/W_V ``[head d_model d_head]``, ``head*d_head`` for W_O ``[head d_head d_model]``."""
    if len(shape) == 1:
        return 1, shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    if name.endswith("W_O"):
        return shape[0] * shape[1], shape[2]
    return shape[1], shape[0] * shape[2]


def init_weights(model: nn.Module, cfg: HookedTransformerConfig) -> None:
    """Initialise as TransformerLens' ``init_mode`` says: every ``W_*`` matrix from the scheme,
    biases zero, norm gains one."""
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        with torch.no_grad():
            if leaf.startswith("W_"):
                fan_in, fan_out = _fans(leaf, param.shape)
                match cfg.init_mode:
                    case "gpt2":
                        param.normal_(0.0, cfg.initializer_range)
                    case "xavier_uniform":
                        bound = cfg.initializer_range * math.sqrt(6.0 / (fan_in + fan_out))
                        param.uniform_(-bound, bound)
                    case "xavier_normal":
                        param.normal_(0.0, cfg.initializer_range * math.sqrt(2.0 / (fan_in + fan_out)))
                    case "kaiming_uniform":
                        bound = cfg.initializer_range * math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(fan_in)
                        param.uniform_(-bound, bound)
                    case "kaiming_normal":
                        param.normal_(0.0, cfg.initializer_range * math.sqrt(2.0) / math.sqrt(fan_in))
                    case other:
                        raise ValueError(f"init_mode={other!r} is not supported (gpt2, xavier_*, kaiming_*)")
            elif leaf == "w":
                param.fill_(1.0)
            else:
                param.zero_()


def _check_padding_side(side: Any) -> None:
    if side not in ("left", "right"):
        raise ValueError(f"default_padding_side must be 'left' or 'right', got {side!r}")


class HookedTransformer(_Base):
    """hooked_attn's HookedTransformer under TransformerLens' constructor and method names."""

    def __init__(self, cfg: HookedTransformerConfig | ModelConfig | dict[str, Any], tokenizer: Any = None,
                 move_to_device: bool = True, default_padding_side: str = "right") -> None:
        _check_padding_side(default_padding_side)
        if isinstance(cfg, dict):
            cfg = HookedTransformerConfig.unwrap(cfg)
        if isinstance(cfg, ModelConfig):
            super().__init__(cfg, tokenizer)
            self.default_padding_side = default_padding_side  # type: ignore[assignment]
            return
        if not isinstance(cfg, HookedTransformerConfig):
            raise TypeError(f"cfg must be a HookedTransformerConfig, its dict or a ModelConfig, got {type(cfg).__name__}")
        cfg.refuse_unsupported()  # before anything is loaded
        if tokenizer is None and cfg.tokenizer_name:  # TransformerLens loads the tokenizer the config names
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name)
        if cfg.d_vocab <= 0 and tokenizer is not None:
            # TransformerLens: the vocabulary size comes from the tokenizer, written into the caller's
            # config as TransformerLens does.
            cfg.d_vocab = max(tokenizer.get_vocab().values()) + 1
            if cfg.d_vocab_out <= 0:
                cfg.d_vocab_out = cfg.d_vocab
        compat, model_cfg = _bind(cfg)
        super().__init__(model_cfg, tokenizer)
        if compat.d_vocab_out != compat.d_vocab:  # TransformerLens: logits over another vocabulary than the input's
            if compat.d_vocab_out <= 0:
                raise ValueError(f"d_vocab_out={compat.d_vocab_out}: give the output vocabulary size")
            self.unembed = _Unembed(dataclasses.replace(model_cfg, d_vocab=compat.d_vocab_out))
        self.default_padding_side = default_padding_side  # type: ignore[assignment]
        self.cfg = compat  # type: ignore[assignment]
        self.model_cfg = model_cfg
        init_weights(self, compat)
        if compat.use_attn_result:
            self.set_use_attn_result(True)
        if compat.use_split_qkv_input:
            self.set_use_split_qkv_input(True)
        if compat.ungroup_grouped_query_attention:
            self.set_ungroup_grouped_query_attention(True)
        if compat.use_hook_mlp_in:
            self.set_use_hook_mlp_in(True)
        self.to(compat.dtype)
        if move_to_device and compat.device is not None:
            self.to(compat.device)

    @classmethod
    def from_pretrained(cls, model_name: Any, **kwargs: Any) -> "HookedTransformer":
        """hooked_attn's loader (see ``hooked_attn.loading.from_pretrained``), returning this class so
        TransformerLens' method signatures (``generate(verbose=...)``...) apply. ``model.cfg`` stays
        hooked_attn's ``ModelConfig``. ``default_padding_side`` is TransformerLens' (the side
        ``to_tokens`` pads a batch on when no ``padding_side`` is given). ``model_name`` is
        TransformerLens' argument name (SAELens passes it by keyword)."""
        return cls._load(_Base.from_pretrained, model_name, kwargs)

    @classmethod
    def from_pretrained_no_processing(cls, model_name: Any, **kwargs: Any) -> "HookedTransformer":
        return cls._load(_Base.from_pretrained_no_processing, model_name, kwargs)

    @classmethod
    def _load(cls, load: Any, name: Any, kwargs: dict[str, Any]) -> "HookedTransformer":
        """TransformerLens' loading arguments on top of hooked_attn's: short names (``"gpt2-small"``),
        ``torch_dtype``, ``default_padding_side`` and ``default_prepend_bos`` (what ``to_tokens`` does
        when no ``prepend_bos`` is given; None, hooked_attn's default, follows the tokenizer)."""
        from hooked_attn.compat.transformer_lens.loading_from_pretrained import check_not_native, get_official_model_name

        padding_side = kwargs.pop("default_padding_side", "right")
        _check_padding_side(padding_side)
        prepend_bos = kwargs.pop("default_prepend_bos", None)
        if prepend_bos not in (None, True, False):
            raise ValueError(f"default_prepend_bos must be True, False or None, got {prepend_bos!r}")
        if "torch_dtype" in kwargs:
            if kwargs.get("dtype") is not None:
                raise ValueError("give dtype= or torch_dtype=, not both")
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        check_not_native(name)
        # hooked_attn's loader bound to cls, so it builds cls(cfg, tokenizer=...): a subclass's own __init__
        # runs, as in TransformerLens (SAELens' HookedSAETransformer adds its hooks there).
        model = load.__func__(cls, get_official_model_name(name) if isinstance(name, str) else name, **kwargs)
        model.default_padding_side = padding_side
        model.default_prepend_bos = prepend_bos
        return model  # type: ignore[return-value]

    @property
    def n_params_total(self) -> int:
        """Every parameter counted (embeddings, biases and norms included), unlike ``cfg.n_params``."""
        return sum(p.numel() for p in self.parameters())

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        super().set_use_attn_result(use_attn_result)
        if isinstance(self.cfg, HookedTransformerConfig):
            self.cfg.use_attn_result = use_attn_result

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        super().set_use_split_qkv_input(use_split_qkv_input)
        if isinstance(self.cfg, HookedTransformerConfig):
            self.cfg.use_split_qkv_input = use_split_qkv_input

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        super().set_use_hook_mlp_in(use_hook_mlp_in)
        if isinstance(self.cfg, HookedTransformerConfig):
            self.cfg.use_hook_mlp_in = use_hook_mlp_in

    def set_ungroup_grouped_query_attention(self, ungroup_grouped_query_attention: bool) -> None:
        super().set_ungroup_grouped_query_attention(ungroup_grouped_query_attention)
        if isinstance(self.cfg, HookedTransformerConfig):
            self.cfg.ungroup_grouped_query_attention = ungroup_grouped_query_attention

    def input_to_embed(self, input: Any, prepend_bos: bool | None = None, padding_side: Any = None,
                       attention_mask: Tensor | None = None, past_kv_cache: Any = None,
                       ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(residual entering block 0, tokens, shortformer_pos_embed, attention_mask)``, as TransformerLens
        returns; the third is the position embedding attention adds to queries and keys (shortformer
        positions), None for other models."""
        if isinstance(input, (str, list)):
            tokens, attention_mask = self._text_to_tokens(input, attention_mask, prepend_bos, padding_side)
        else:
            tokens = input
        if not isinstance(self.cfg.positions, ShortformerPositions):
            resid = self.forward(tokens, attention_mask=attention_mask, stop_at_layer=0, past_kv_cache=past_kv_cache)
            return resid, tokens, None, attention_mask
        seen: list[Tensor] = []
        keep = lambda pos_embed, hook: seen.append(pos_embed)  # noqa: E731  (returns None: changes nothing)
        with self.hooks([("hook_pos_embed", keep)]):
            resid = self.forward(tokens, attention_mask=attention_mask, stop_at_layer=0, past_kv_cache=past_kv_cache)
        return resid, tokens, seen[-1], attention_mask

    @property
    def W_E_pos(self) -> Tensor:
        """``[d_vocab + n_ctx, d_model]``: the token embedding stacked over the learned position embedding,
        as TransformerLens has it (AttributeError on a model without learned positions)."""
        return torch.cat([self.W_E, self.W_pos], dim=0)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict`` that also reads TransformerLens' own state dicts: grouped-query
        ``attn._W_K``/``_W_V``/``_b_K``/``_b_V`` load into ``W_K``/``W_V``/``b_K``/``b_V``, the buffers
        TransformerLens derives from the config (``attn.IGNORE``, ``mask``, ``rotary_sin``/``rotary_cos``)
        are dropped (this model builds its own), and a gated MLP's absent ``b_gate`` (TransformerLens has
        none) loads as zeros. The caller's dict is left as it was."""
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        given: dict[str, Any] = {}
        for key, value in state_dict.items():
            head, _, leaf = key.rpartition(".")
            if key not in own and leaf in _TL_KV_NAMES and f"{head}.{_TL_KV_NAMES[leaf]}" in own:
                key = f"{head}.{_TL_KV_NAMES[leaf]}"
            elif key not in own and leaf in _TL_DERIVED_BUFFERS and head.endswith(".attn"):
                continue
            given[key] = value
        for key, param in own.items():
            head, _, leaf = key.rpartition(".")
            if leaf == "b_gate" and key not in given and f"{head}.W_gate" in given:
                given[key] = torch.zeros_like(param)
        return super().load_state_dict(given, strict=strict, assign=assign)

    def forward(self, input: Any, *args: Any, **kwargs: Any) -> Any:
        """hooked_attn's forward; 1-D token ids ``[pos]`` are read as one row ``[1 pos]``, as TransformerLens
        does (a residual given with ``start_at_layer`` is passed on unchanged)."""
        if (isinstance(input, Tensor) and input.ndim == 1 and not input.dtype.is_floating_point
                and kwargs.get("start_at_layer") is None):
            input = input[None]
        return super().forward(input, *args, **kwargs)

    def run_with_cache(self, *model_args: Any, return_cache_object: bool = True, **kwargs: Any) -> tuple[Any, Any]:
        """hooked_attn's ``run_with_cache``; the cache is TransformerLens' ActivationCache subclass
        (``apply_slice_to_batch_dim``, TransformerLens' batch-axis rules), or with
        ``return_cache_object=False`` its plain ``{name: tensor}`` dict."""
        from hooked_attn.compat.transformer_lens.ActivationCache import as_transformer_lens

        out, cache = super().run_with_cache(*model_args, **kwargs)
        return out, (as_transformer_lens(cache) if return_cache_object else cache.cache_dict)

    def generate(self, input: Any = "", max_new_tokens: int = 10, stop_at_eos: bool = True,
                 eos_token_id: int | list[int] | None = None, do_sample: bool = True, top_k: int | None = None,
                 top_p: float | None = None, temperature: float = 1.0, freq_penalty: float = 0.0,
                 use_past_kv_cache: bool = True, prepend_bos: bool | None = None, padding_side: str | None = None,
                 return_type: str = "input", verbose: bool = True, **kwargs: Any) -> Any:
        """TransformerLens' ``generate``: sampling by default (``do_sample=True``), ``verbose`` accepted
        (hooked_attn shows no progress bar). Without a tokenizer, ``stop_at_eos`` needs ``eos_token_id``
        (or one on the config)."""
        if freq_penalty:
            raise CompatError("freq_penalty is not supported by hooked_attn's generate; use "
                              "transformer_lens.utilities.logits_utils.sample_logits in a loop of your own")
        if padding_side not in (None, "left"):
            raise CompatError(f"generate pads prompts on the left; padding_side={padding_side!r} is not supported")
        if stop_at_eos and eos_token_id is None:
            eos_token_id = getattr(self.cfg, "eos_token_id", None)
            if eos_token_id is None and self.tokenizer is None:
                raise CompatError("stop_at_eos=True needs an eos_token_id: the model has no tokenizer and its config "
                                  "none; pass eos_token_id= or stop_at_eos=False")
        return super().generate(input, max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                                top_p=top_p, stop_at_eos=stop_at_eos, eos_token_id=eos_token_id,
                                use_past_kv_cache=use_past_kv_cache, prepend_bos=prepend_bos,
                                return_type=return_type, **kwargs)

    def to_tokens(self, input: str | list[str], prepend_bos: bool | None = None, padding_side: Any = None,
                  move_to_device: bool = True, truncate: bool = True) -> Tensor:
        """hooked_attn's ``to_tokens`` with TransformerLens' ``truncate``: on by default, it cuts ids past
        the model's context (``cfg.n_ctx``) off the end, as TransformerLens does."""
        from hooked_attn.tokens import PADDING_MASK_ATTR

        tokens = super().to_tokens(input, prepend_bos, padding_side, move_to_device)
        n_ctx = self.cfg.n_ctx
        if not truncate or tokens.shape[-1] <= n_ctx:
            return tokens
        mask = getattr(tokens, PADDING_MASK_ATTR, None)
        tokens = tokens[..., :n_ctx]
        if mask is not None:
            setattr(tokens, PADDING_MASK_ATTR, mask[..., :n_ctx])
        return tokens
