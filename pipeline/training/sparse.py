"""Products with a batch of TopK codes kept sparse, for training.

A TopK SAE's batch of latents has k non-zeros per row of d_sae. Multiplied densely, its decode,
the AuxK decode and their backward passes cost as much as the encoder's matrix product each;
as compressed sparse rows they cost what their k·d_in products cost, the saving Gao et al.
(2024) wrote their TopK kernels for.
"""

from __future__ import annotations

from functools import cached_property

import torch
from jaxtyping import Float, Int64
from torch import Tensor


class SparsePattern:
    """Where each row of a [batch, n_latents] matrix is non-zero: `indices[b]`, k per row."""

    def __init__(self, indices: Int64[Tensor, "batch k"], n_latents: int) -> None:
        # Ascending within a row, as compressed sparse rows expect.
        self.indices = indices.sort(dim=-1).values
        self.n_latents = n_latents

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.indices), self.n_latents

    @cached_property
    def _row_starts(self) -> Tensor:
        batch, k = self.indices.shape
        return torch.arange(0, batch * k + 1, k, device=self.indices.device)

    @cached_property
    def _transpose(self) -> tuple[Tensor, Tensor, Tensor]:
        """Column starts, rows and the order of the values of the [n_latents, batch] matrix."""
        columns = self.indices.flatten()
        order = columns.argsort(stable=True)
        rows = torch.arange(len(self.indices), device=columns.device)
        rows = rows.repeat_interleave(self.indices.shape[1])[order]
        starts = torch.zeros(self.n_latents + 1, dtype=torch.long, device=columns.device)
        starts[1:] = torch.bincount(columns, minlength=self.n_latents).cumsum(0)
        return starts, rows, order

    def matrix(self, values: Float[Tensor, "batch k"]) -> Tensor:
        """The [batch, n_latents] matrix with `values` at the pattern, sparse."""
        return torch.sparse_csr_tensor(
            self._row_starts, self.indices.flatten(), values.flatten(), self.shape
        )

    def transposed(self, values: Float[Tensor, "batch k"]) -> Tensor:
        """The transpose of `matrix(values)`, [n_latents, batch], sparse."""
        starts, rows, order = self._transpose
        return torch.sparse_csr_tensor(starts, rows, values.flatten()[order], self.shape[::-1])

    def sampled(self, left: Float[Tensor, "batch p"], right: Float[Tensor, "p n"]) -> Tensor:
        """(left @ right) at the pattern only, [batch, k]."""
        zeros = torch.zeros(self.indices.shape, dtype=left.dtype, device=left.device)
        product = torch.sparse.sampled_addmm(self.matrix(zeros), left, right, beta=0.0)
        return product.values().view(self.indices.shape)


class _SampledProduct(torch.autograd.Function):
    """(left @ right) at the pattern, from the dense product already computed."""

    @staticmethod
    def forward(
        ctx, left: Tensor, right: Tensor, product: Tensor, pattern: SparsePattern
    ) -> Tensor:
        ctx.save_for_backward(left, right)
        ctx.pattern = pattern
        return product.gather(1, pattern.indices)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        left, right = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        grad_left = pattern.matrix(grad) @ right.T if ctx.needs_input_grad[0] else None
        grad_right = (pattern.transposed(grad) @ left).T if ctx.needs_input_grad[1] else None
        return grad_left, grad_right, None, None


class _SparseDecode(torch.autograd.Function):
    """matrix(values) @ rows."""

    @staticmethod
    def forward(ctx, values: Tensor, rows: Tensor, pattern: SparsePattern) -> Tensor:
        ctx.save_for_backward(values, rows)
        ctx.pattern = pattern
        return pattern.matrix(values) @ rows

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        values, rows = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        grad_values = pattern.sampled(grad, rows.T) if ctx.needs_input_grad[0] else None
        grad_rows = pattern.transposed(values) @ grad if ctx.needs_input_grad[1] else None
        return grad_values, grad_rows, None


def sampled_product(
    left: Float[Tensor, "batch p"],
    right: Float[Tensor, "p n"],
    product: Float[Tensor, "batch n"],
    pattern: SparsePattern,
) -> Float[Tensor, "batch k"]:
    """`product` (= left @ right, computed without gradient) at the pattern, with the gradient
    of left @ right there: the backward pass touches only the pattern's entries."""
    return _SampledProduct.apply(left, right, product, pattern)


def sparse_decode(
    values: Float[Tensor, "batch k"], rows: Float[Tensor, "n d"], pattern: SparsePattern
) -> Float[Tensor, "batch d"]:
    """Σ_j values[b, j] · rows[pattern.indices[b, j]], differentiable in values and rows."""
    return _SparseDecode.apply(values, rows, pattern)
