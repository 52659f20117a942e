"""FactoredMatrix: a matrix kept as a product ``A @ B`` of low rank, for the QK and OV circuits.

``A [... m r]`` and ``B [... r n]`` with ``r`` the inner (low) dimension. SVD, eigenvalues, norms and
products work on the factors: the ``m x n`` matrix is built only by ``.AB`` (or ``.BA``, ``r x r``).
Semantics follow TransformerLens: ``svd()`` returns ``V`` (``AB = U diag(S) V^T``), products keep the
smaller inner dimension, and a vector multiplies every matrix of the batch.
"""

import warnings
from functools import cached_property
from typing import Any, Union

import torch
from torch import Tensor


class FactoredShapeError(ValueError, AssertionError):
    """Shapes that do not fit: a product whose inner sizes differ, ``BA`` of a non-square matrix, a
    non-scalar factor. An AssertionError too, which is what TransformerLens raises."""


def _keep_axis(i: Any) -> Any:
    """An index that keeps its axis: an int ``i`` becomes the one-element slice at ``i``."""
    if isinstance(i, int):
        return slice(i, None) if i == -1 else slice(i, i + 1)
    return i


class FactoredMatrix:
    """The matrix ``A @ B``, batched over any leading axes (e.g. ``[layer head]``)."""

    def __init__(self, A: Any, B: Any) -> None:
        if A.ndim < 2 or B.ndim < 2 or A.shape[-1] != B.shape[-2]:
            raise FactoredShapeError(f"cannot factor A {tuple(A.shape)} @ B {tuple(B.shape)}: inner dimensions differ")
        batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        self.A = A if tuple(A.shape[:-2]) == tuple(batch) else A.broadcast_to((*batch, *A.shape[-2:]))
        self.B = B if tuple(B.shape[:-2]) == tuple(batch) else B.broadcast_to((*batch, *B.shape[-2:]))

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
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def has_leading_dims(self) -> bool:
        return self.A.ndim > 2

    @property
    def AB(self) -> Tensor:
        """The full ``[... m n]`` matrix (materialised)."""
        return self.A @ self.B

    @property
    def BA(self) -> Tensor:
        """The small ``[... r r]`` product, which shares the non-zero eigenvalues of ``AB``."""
        if self.ldim != self.rdim:
            raise FactoredShapeError(f"BA needs a square matrix, this one is {self.ldim} x {self.rdim}")
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(self.B.mT, self.A.mT)

    @cached_property
    def _svd(self) -> tuple[Tensor, Tensor, Tensor]:
        # AB = Qa Ra Rb^T Qb^T with QR factors of A and B^T; only the small core is decomposed.
        wide = torch.float32 if self.A.dtype in (torch.bfloat16, torch.float16) else self.A.dtype
        Qa, Ra = torch.linalg.qr(self.A.to(wide))
        Qb, Rb = torch.linalg.qr(self.B.mT.to(wide))
        U, S, Vh = torch.linalg.svd(Ra @ Rb.mT, full_matrices=False)  # thin: r = min(m, inner, n)
        return Qa @ U, S, Qb @ Vh.mT

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """``U [... m r]``, ``S [... r]``, ``V [... n r]`` with ``AB = U diag(S) V^T`` (thin SVD, as
        TransformerLens returns it: ``V``, not ``Vh``). Computed once per matrix."""
        return self._svd

    @property
    def U(self) -> Tensor:
        return self._svd[0]

    @property
    def S(self) -> Tensor:
        return self._svd[1]

    @property
    def V(self) -> Tensor:
        return self._svd[2]

    @property
    def Vh(self) -> Tensor:
        """Deprecated alias of ``V`` (TransformerLens' spelling); note it is ``V``, not ``V^T``."""
        warnings.warn("FactoredMatrix.Vh is V (AB = U diag(S) V^T); write .V", DeprecationWarning, stacklevel=2)
        return self.V

    @property
    def eigenvalues(self) -> Tensor:
        """The eigenvalues of ``AB`` that may be non-zero (those of ``BA``), complex; computed in at
        least float32, so bfloat16 and float16 matrices work."""
        BA = self.BA
        if BA.dtype in (torch.bfloat16, torch.float16):
            BA = BA.float()
        return torch.linalg.eigvals(BA)

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
        """The same matrix as ``(U sqrt S) @ (sqrt S V^T)``: both factors carry equal singular values."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * self.V.mT)

    def collapse_l(self) -> Tensor:
        """``diag(S) V^T [... r n]``: ``AB`` with its orthonormal left factor ``U`` dropped."""
        return self.S[..., :, None] * self.V.mT

    def collapse_r(self) -> Tensor:
        """``U diag(S) [... m r]``: ``AB`` with its orthonormal right factor ``V^T`` dropped."""
        return self.U * self.S[..., None, :]

    @property
    def pair(self) -> tuple[Tensor, Tensor]:
        return self.A, self.B

    def unsqueeze(self, dim: int) -> "FactoredMatrix":
        """A new leading axis of size 1 at ``dim`` (on both factors); ``dim`` counts over the full shape
        ``[*leading ldim rdim]`` and must land among the leading axes."""
        n_lead = self.ndim - 2
        pos = dim if dim >= 0 else dim + self.ndim + 1
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= pos <= n_lead:
            raise FactoredShapeError(f"unsqueeze(dim={dim!r}) must add a leading axis (0..{n_lead}, or "
                                     f"{-self.ndim - 1}..-3) of this {self.ndim}-d factored matrix, not split "
                                     "the matrix axes")
        return FactoredMatrix(self.A.unsqueeze(pos), self.B.unsqueeze(pos))

    def __matmul__(self, other: Any) -> Any:
        rows = other.ldim if isinstance(other, FactoredMatrix) else (
            other.shape[-1] if getattr(other, "ndim", 2) == 1 else other.shape[-2] if hasattr(other, "shape") else None)
        if rows is not None and rows != self.rdim:
            raise FactoredShapeError(f"cannot multiply a {tuple(self.shape)} FactoredMatrix by {tuple(other.shape)}: "
                                     f"{self.rdim} columns against {rows} rows")
        if isinstance(other, FactoredMatrix):
            # (A B)(C D): the product's inner dimension is the smallest of r1, n (= rdim = other.ldim), r2.
            r1, n, r2 = self.mdim, self.rdim, other.mdim
            if r1 <= min(n, r2):
                return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
            if r2 <= min(n, r1):
                return FactoredMatrix(self.A @ (self.B @ other.A), other.B)
            return FactoredMatrix(self.AB, other.AB)
        if not hasattr(other, "ndim"):
            return NotImplemented
        if other.ndim == 1:  # a vector: one per matrix of the batch
            return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
        if other.shape[-2] < self.mdim:  # the matrix's rows are fewer: they become the inner dimension
            return FactoredMatrix(self.AB, other)
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other: Any) -> Any:
        if not hasattr(other, "ndim"):
            return NotImplemented
        if other.shape[-1] != self.ldim:
            raise FactoredShapeError(f"cannot multiply {tuple(other.shape)} by a {tuple(self.shape)} FactoredMatrix: "
                                     f"{other.shape[-1]} columns against {self.ldim} rows")
        if other.ndim == 1:  # a row vector: one per matrix of the batch
            return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
        if other.shape[-1] < self.mdim:
            return FactoredMatrix(other, self.AB)
        return FactoredMatrix(other @ self.A, self.B)

    def __mul__(self, scalar: Any) -> "FactoredMatrix":
        """Multiply by a number (or a one-element tensor); anything else raises, never broadcasts."""
        if isinstance(scalar, Tensor):
            if scalar.numel() != 1:
                raise FactoredShapeError(f"a FactoredMatrix multiplies by a scalar only, got a tensor of shape "
                                 f"{tuple(scalar.shape)} (for a matrix product use @)")
            scalar = scalar.reshape(())
        elif not isinstance(scalar, (int, float)):
            return NotImplemented
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    def __getitem__(self, index: Any) -> "FactoredMatrix":
        """Index the leading (batch) axes: ``model.OV[3, 5]`` is layer 3, head 5. Past the batch axes,
        the next index selects rows (of ``A``) and the one after columns (of ``B``)."""
        index = index if isinstance(index, tuple) else (index,)
        n_batch = self.A.ndim - 2
        if len(index) > n_batch + 2:
            raise IndexError(f"a FactoredMatrix of shape {tuple(self.shape)} takes at most {n_batch + 2} indices")
        batch = index[:n_batch]
        A, B = self.A[batch], self.B[batch]
        if len(index) > n_batch:  # rows: an int keeps the row axis (a one-row matrix)
            A = A[(..., _keep_axis(index[n_batch]), slice(None))]
        if len(index) > n_batch + 1:
            B = B[(..., _keep_axis(index[n_batch + 1]))]
        return FactoredMatrix(A, B)

    def get_corner(self, k: int = 3) -> Tensor:
        """The first ``k`` entries along every axis of ``AB`` (batch axes too), from the factors."""
        n_batch = self.A.ndim - 2
        lead = tuple(slice(k) for _ in range(n_batch))
        return self.A[(*lead, slice(k), slice(None))] @ self.B[(*lead, slice(None), slice(k))]

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, inner={self.mdim})"
