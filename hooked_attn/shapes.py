"""The axis glossary and the shared tensor aliases used in every signature.

Axis names (used in jaxtyping shapes, einops patterns, hook tables and the docs):

=========  ==================================================================
``batch``   independent sequences run together
``pos``     sequence position (residual stream, q, k, v, z)
``q_pos``   query position, in attention score and pattern tensors
``k_pos``   key position, in attention score and pattern tensors
``head``    query (attention) head
``kv_head`` key/value head; equal to ``head`` for multi-head attention
``d_model`` residual stream width
``d_head``  width of one attention head
``d_mlp``   MLP hidden width
``d_vocab`` vocabulary size
``layer``   transformer block index
``expert``  mixture-of-experts expert (router logits)
``top_k``   the experts chosen for one token, most probable first
=========  ==================================================================
"""

from collections.abc import Mapping

from jaxtyping import Float, Int
from torch import Tensor

StateDict = Mapping[str, Tensor]

Tokens = Int[Tensor, "batch pos"]
Residual = Float[Tensor, "batch pos d_model"]
Logits = Float[Tensor, "batch pos d_vocab"]

__all__ = ["Logits", "Residual", "StateDict", "Tokens"]
