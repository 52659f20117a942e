"""FactoredMatrix: a matrix kept as a product ``A @ B`` of low rank, for the QK and OV circuits.

``A [... m r]`` and ``B [... r n]`` with ``r`` the inner (low) dimension. SVD, eigenvalues, norms and
products work on the factors: the ``m x n`` matrix is built only by ``.AB`` (or ``.BA``, ``r x r``).
"""

from functools import cached_property
from typing import Union

import torch
from torch import Tensor


class FactoredMatrix:
    """The matrix ``A @ B``, batched over any leading axes (e.g. ``[layer head]``)."""

    def __init__(self, A: Tensor, B: Tensor) -> None:
        if A.ndim < 2 or B.ndim < 2 or A.shape[-1] != B.shape[-2]:
            raise ValueError(f"cannot factor A {tuple(A.shape)} @ B {tuple(B.shape)}: inner dimensions differ")
        batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        self.A = A.expand(*batch, *A.shape[-2:])
        self.B = B.expand(*batch, *B.shape[-2:])

    @property
    def ldim(self) -> int:
        return self.A.shape[-2]

    @property
    def rdim(self) -> int:
        return self.B.shape[-1]

    @property
    def mdim(self) -> int:
        """The inner dimension, an upper bound on the rank."""
        return self.A.shape[-1]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.A.shape[:-2], self.ldim, self.rdim))

    @property
    def AB(self) -> Tensor:
        """The full ``[... m n]`` matrix (materialised)."""
        return self.A @ self.B

    @property
    def BA(self) -> Tensor:
        """The small ``[... r r]`` product, which shares the non-zero eigenvalues of ``AB``."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square matrix, this one is {self.ldim} x {self.rdim}")
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(self.B.mT, self.A.mT)

    @cached_property
    def _svd(self) -> tuple[Tensor, Tensor, Tensor]:
        # AB = Qa Ra Rb^T Qb^T with QR factors of A and B^T; only the r x r core is decomposed.
        Qa, Ra = torch.linalg.qr(self.A)
        Qb, Rb = torch.linalg.qr(self.B.mT)
        U, S, Vh = torch.linalg.svd(Ra @ Rb.mT)
        return Qa @ U, S, Vh @ Qb.mT

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """``U [... m r]``, ``S [... r]``, ``Vh [... r n]`` with ``AB = U diag(S) Vh`` (thin SVD)."""
        return self._svd

    @property
    def U(self) -> Tensor:
        return self._svd[0]

    @property
    def S(self) -> Tensor:
        return self._svd[1]

    @property
    def Vh(self) -> Tensor:
        return self._svd[2]

    @property
    def eigenvalues(self) -> Tensor:
        """The eigenvalues of ``AB`` that may be non-zero (those of ``BA``), complex in general."""
        return torch.linalg.eigvals(self.BA)

    def norm(self) -> Tensor:
        """The Frobenius norm, from the singular values."""
        return self.S.pow(2).sum(-1).sqrt()

    def rank(self, tol: float | None = None) -> Tensor:
        """How many singular values exceed ``tol`` (default: the dtype's eps times the largest, times the size)."""
        S = self.S
        if tol is None:
            tol = torch.finfo(S.dtype).eps * max(self.ldim, self.rdim)
            return (S > tol * S[..., :1]).sum(-1)
        return (S > tol).sum(-1)

    def make_even(self) -> "FactoredMatrix":
        """The same matrix as ``(U sqrt S) @ (sqrt S Vh)``: both factors carry equal singular values."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * self.Vh)

    @property
    def pair(self) -> tuple[Tensor, Tensor]:
        return self.A, self.B

    def __matmul__(self, other: Union[Tensor, "FactoredMatrix"]) -> "FactoredMatrix":
        if isinstance(other, FactoredMatrix):
            # (A B)(C D) = A (B C D): keep the smaller inner dimension.
            middle = self.B @ other.A  # [... r1 r2]
            if self.mdim <= other.mdim:
                return FactoredMatrix(self.A, middle @ other.B)
            return FactoredMatrix(self.A @ middle, other.B)
        if other.ndim == 1:
            return self.A @ (self.B @ other)  # type: ignore[return-value]
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other: Tensor) -> "FactoredMatrix":
        if other.ndim == 1:
            return (other @ self.A) @ self.B  # type: ignore[return-value]
        return FactoredMatrix(other @ self.A, self.B)

    def __mul__(self, scalar: float) -> "FactoredMatrix":
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    def __getitem__(self, index: int | slice | tuple) -> "FactoredMatrix":
        """Index the leading (batch) axes: ``model.OV[3, 5]`` is layer 3, head 5."""
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > self.A.ndim - 2:
            raise IndexError(f"a FactoredMatrix of shape {tuple(self.shape)} has {self.A.ndim - 2} batch axes")
        return FactoredMatrix(self.A[index], self.B[index])

    def get_corner(self, k: int = 3) -> Tensor:
        """The top-left ``k x k`` block of ``AB``, computed from the factors."""
        return self.A[..., :k, :] @ self.B[..., :, :k]

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, inner={self.mdim})"
