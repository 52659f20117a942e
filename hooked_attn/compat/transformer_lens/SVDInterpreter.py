"""TransformerLens' SVDInterpreter: the singular directions of a head's OV circuit or a layer's MLP
weights, read in vocabulary space through the unembedding."""

from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_attn.compat.errors import CompatError

VectorType = Literal["OV", "w_in", "w_out"]


class SVDInterpreter:
    """``get_singular_vectors(kind, layer_index, num_vectors, head_index)`` for a model's weights.

    - ``"OV"``: a head's ``W_V W_O`` ``[d_model d_model]``; the directions it writes are its right
      singular vectors.
    - ``"w_in"``: the MLP's ``W_in`` ``[d_model d_mlp]``; the residual directions it reads are its left
      singular vectors.
    - ``"w_out"``: the MLP's ``W_out`` ``[d_mlp d_model]``; the directions it writes are its right
      singular vectors.

    Each direction (largest singular value first) is multiplied by ``W_U``, giving its logit effect on
    every token. A singular vector's sign is arbitrary, so compare magnitudes (``.abs()``).
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.cfg = model.cfg

    @torch.no_grad()
    def get_singular_vectors(self, vector_type: VectorType, layer_index: int, num_vectors: int = 10,
                             head_index: int | None = None) -> Float[Tensor, "d_vocab 1 num_vectors"]:
        """The top ``num_vectors`` singular directions in vocabulary space, ``[d_vocab 1 num_vectors]``.

        Raises:
            jaxtyping.TypeCheckError: ``vector_type`` is not one of "OV", "w_in", "w_out".
            CompatError (ValueError and AssertionError): no ``head_index`` for "OV", or an index out of range.
        """
        if vector_type not in ("OV", "w_in", "w_out"):
            from jaxtyping import TypeCheckError

            raise TypeCheckError(f"vector_type must be one of 'OV', 'w_in', 'w_out', got {vector_type!r}")
        if head_index is None and vector_type == "OV":
            raise CompatError(f"Head index optional only for w_in and w_out, got {vector_type}")
        n_layers, n_heads = self.cfg.n_layers, self.cfg.n_heads
        if not 0 <= layer_index < n_layers:
            raise CompatError(f"Layer index must be between 0 and {n_layers - 1} but got {layer_index}")
        if head_index is not None and not 0 <= head_index < n_heads:
            raise CompatError(f"Head index must be between 0 and {n_heads - 1} but got {head_index}")
        match vector_type:
            case "OV":
                ov = self.model.OV[layer_index, head_index]
                directions = ov.svd()[2][:, :num_vectors]  # V: [d_model, rank]
            case "w_in":
                u, _, _ = torch.linalg.svd(self.model.W_in[layer_index].float(), full_matrices=False)
                directions = u[:, :num_vectors]
            case "w_out":
                _, _, vh = torch.linalg.svd(self.model.W_out[layer_index].float(), full_matrices=False)
                directions = vh[:num_vectors].T
        in_vocab = directions.to(self.model.W_U.dtype).T @ self.model.W_U  # [num_vectors, d_vocab]
        return in_vocab.T[:, None, :]


__all__ = ["SVDInterpreter"]
