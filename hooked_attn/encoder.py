"""HookedEncoder: BERT-style bidirectional encoders, built from the same components and hook vocabulary.

embed + token-type + position embeddings -> embedding LayerNorm -> post-LN blocks (bidirectional
attention) -> optional masked-LM head (dense, activation, LayerNorm, unembed).
"""

import os
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from hooked_attn.components.activations import ACTIVATIONS
from hooked_attn.components.attention import AttentionContext
from hooked_attn.components.block import TransformerBlock
from hooked_attn.components.embed import Embed, PosEmbed
from hooked_attn.components.norms import Norm
from hooked_attn.components.params import strided_parameter
from hooked_attn.components.unembed import Unembed
from hooked_attn.config import ModelConfig, Processing
from hooked_attn.hook_points import HookedRootModule, HookPoint
from hooked_attn.loading import DeviceArg, DtypeArg, load_weights, materialise, open_source
from hooked_attn.sources import Source, TokenizerArg
from hooked_attn.tokens import PADDING_MASK_ATTR, TokenizerMixin, check_attention_mask

EncoderReturn = Literal["logits", "embeddings"] | None


class TokenTypeEmbed(nn.Module):
    """``W_token_type [n_token_types d_model]``: BERT's segment embedding."""

    def __init__(self, n_token_types: int, d_model: int) -> None:
        super().__init__()
        self.W_token_type = nn.Parameter(torch.empty(n_token_types, d_model))

    def forward(self, token_type_ids: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        n_types = self.W_token_type.shape[0]
        if token_type_ids.numel() and (int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= n_types):
            raise ValueError(f"token_type_ids must be in 0..{n_types - 1}, got {token_type_ids.unique().tolist()}")
        return F.embedding(token_type_ids, self.W_token_type)


class MLMHead(nn.Module):
    """BERT's prediction-head transform: ``ln(act(x W + b))``, read by the unembedding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[cfg.act_fn]
        self.W = strided_parameter((cfg.d_model, cfg.d_model), (1, 0))
        self.b = nn.Parameter(torch.empty(cfg.d_model))
        self.ln = Norm(cfg.norm, cfg.d_model)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        return self.ln(self.act(F.linear(x, self.W.T, self.b)))


class HookedEncoder(TokenizerMixin, HookedRootModule):
    """A BERT-style encoder with a HookPoint at every activation (see docs/encoder.md).

    Hooks: ``hook_embed``, ``hook_pos_embed``, ``hook_token_type_embed``, ``embed_ln.*``, and per
    block the decoder's vocabulary (``attn.hook_q`` ... ``hook_resid_post``; ``ln1``/``ln2`` are
    BERT's post-attention and post-MLP LayerNorms). ``mlm_head.ln.*`` when there is a head.
    """

    def __init__(
        self, cfg: ModelConfig, n_token_types: int, mlm_head: bool, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> None:
        super().__init__()
        if cfg.causal or cfg.embed_norm is None:
            raise ValueError("HookedEncoder needs a bidirectional config with an embedding norm")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed = Embed(cfg)
        self.hook_embed = HookPoint()
        self.pos_embed = PosEmbed(cfg, cfg.n_ctx)
        self.hook_pos_embed = HookPoint()
        self.token_type_embed = TokenTypeEmbed(n_token_types, cfg.d_model)
        self.hook_token_type_embed = HookPoint()
        self.embed_ln = Norm(cfg.embed_norm, cfg.d_model)
        self.blocks = nn.ModuleList(TransformerBlock(cfg, layer) for layer in range(cfg.n_layers))
        if mlm_head:
            self.mlm_head = MLMHead(cfg)
            self.unembed = Unembed(cfg)
        self.setup()

    @property
    def device(self) -> torch.device:
        return self.embed.W_E.device

    @classmethod
    def from_pretrained(
        cls, model_name_or_path: Source, *, tokenizer: TokenizerArg = None, dtype: DtypeArg = None,
        device: DeviceArg = None, center_unembed: bool = True, fold_value_biases: bool = True,
        gguf_file: str | None = None, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
        release_source: bool = False,
    ) -> "HookedEncoder":
        """Load a ``BertModel`` or ``BertForMaskedLM`` (folder, hub id, GGUF file or in-memory model),
        through the same pipeline as ``HookedTransformer.from_pretrained`` (see it for the arguments).

        BERT's LayerNorms come after each residual sum, so they cannot be folded and the writing
        weights cannot be centred; only the unembedding (with a head) and the value biases are processed.
        """
        steps = Processing(center_unembed=center_unembed, fold_value_biases=fold_value_biases)
        opened = open_source(model_name_or_path, kind="encoder", tokenizer=tokenizer, dtype=dtype, device=device,
                             gguf_file=gguf_file, revision=revision, cache_dir=cache_dir, release_source=release_source)
        loaded = load_weights(opened, steps)
        return materialise(lambda w: cls(w.cfg, w.hf_config.type_vocab_size, mlm_head="unembed.W_U" in w.state_dict,
                                         tokenizer=w.tokenizer), loaded)

    def forward(
        self, input: str | list[str] | Tensor, return_type: EncoderReturn = None,
        token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None,
    ) -> Tensor | None:
        """Encode ``input`` (token ids ``[batch pos]``, a string, or a list of strings).

        Returns the masked-LM logits (``return_type="logits"``, the default with a head) or the final
        hidden states ``[batch pos d_model]`` (``"embeddings"``, the default without one, equal to
        HF ``BertModel``'s ``last_hidden_state``).
        """
        if isinstance(input, (str, list)):
            input, text_mask = self._tokenize(input, None, None)
            if attention_mask is not None and tuple(attention_mask.shape) != tuple(text_mask.shape):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, but the text tokenizes "
                                 f"to {tuple(text_mask.shape)} [batch pos]")
            # A mask given with text can only hide more tokens (it was ignored).
            text_mask = text_mask if attention_mask is None else text_mask * attention_mask.to(text_mask)
            input, attention_mask = input.to(self.device), text_mask.to(self.device)
        if attention_mask is None:  # ids that to_tokens padded carry their mask
            attention_mask = getattr(input, PADDING_MASK_ATTR, None)
        if input.ndim != 2 or input.dtype.is_floating_point or input.dtype.is_complex or input.dtype == torch.bool:
            raise ValueError(f"expected token ids of shape [batch pos], got {input.dtype} {tuple(input.shape)}")
        if input.dtype not in (torch.int64, torch.int32):
            input = input.long()  # uint8/int16 ids: F.embedding takes int32 and int64 only
        if token_type_ids is not None and (token_type_ids.dtype.is_floating_point or token_type_ids.dtype == torch.bool):
            raise ValueError(f"token_type_ids must be integer ids, got dtype {token_type_ids.dtype}")
        if input.shape[1] == 0:
            raise ValueError("the input has no positions: a sequence needs at least one token")
        if return_type is None:
            return_type = "logits" if hasattr(self, "unembed") else "embeddings"
        if return_type not in ("logits", "embeddings"):
            raise ValueError(f"return_type must be 'logits', 'embeddings' or None, got {return_type!r}")
        if return_type == "logits" and not hasattr(self, "unembed"):
            raise ValueError("this encoder has no masked-LM head: use return_type='embeddings'")
        if attention_mask is not None:
            attention_mask = check_attention_mask(attention_mask, tuple(input.shape), input.device)
        if token_type_ids is not None and token_type_ids.shape != input.shape:
            raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)}, but the input is "
                             f"{tuple(input.shape)}")
        batch, n_pos = input.shape
        # HF BERT: absolute positions; a padding query sees the real keys, as every other query does.
        ctx = AttentionContext.build(batch, n_pos, input.device, attention_mask, causal=False, real_positions=False,
                                     padding_sees_itself=False)
        token_type_ids = torch.zeros_like(input) if token_type_ids is None else token_type_ids
        resid = (self.hook_embed(self.embed(input)) + self.hook_token_type_embed(self.token_type_embed(token_type_ids))
                 + self.hook_pos_embed(self.pos_embed(ctx.positions)))
        resid = self.embed_ln(resid)
        for block in self.blocks:
            resid = block(resid, ctx)
        if return_type == "embeddings":
            return resid
        return self.unembed(self.mlm_head(resid))
