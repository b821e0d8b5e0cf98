"""Description length (Ayonrinde, Pearce and Sharkey, 2024): the bits per token a latent costs to
send whether it fires and, where it does, its activation at a set precision,

    DL_i = H_b(p_i) + p_i·H(q_i),

p_i its frequency over the corpus tokens, H_b the binary entropy, and q_i the distribution of its
active values quantised to log-spaced bins: `precision` bins per decade, from the build's fine
histogram (all corpus tokens). A latent whose active values share one bin costs H_b(p_i) ≤ 1 bit.

The precision is that of the reconstruction: the coarsest of PRECISIONS at which replacing every
active value by its bin's centre raises the reconstruction's MSE on the evaluation contexts by at
most MSE_TOLERANCE (relative). A log grid is a relative precision, as a float's mantissa is.
Unlike SAEBench's equal-width bins over [0, max], whose zero bin holds the inactive tokens, q_i
here counts the active values only: sending whether the latent fires is H_b's part.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from saescope.db.codec import HISTOGRAM_BINS_PER_DECADE, HISTOGRAM_LOG10_MAX, HISTOGRAM_LOG10_MIN
from saescope.pipeline.saes import by_row_blocks

# Bins per decade tried, finest last: each divides the fine histogram's.
PRECISIONS = (1, 2, 4, 8, 16, 32, 64)
MSE_TOLERANCE = 0.05


def entropy_bits(counts: Float[np.ndarray, "rows bins"]) -> Float[np.ndarray, " rows"]:
    """The entropy (bits) of each row of counts, as a distribution (0 for an empty row)."""
    total = counts.sum(1, keepdims=True)
    share = np.divide(counts, total, out=np.zeros(counts.shape), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(share > 0, -share * np.log2(share), 0.0)
    return terms.sum(1)


def binary_entropy_bits(p: Float[np.ndarray, " n"]) -> Float[np.ndarray, " n"]:
    p = np.clip(p, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = -p * np.log2(p) - (1 - p) * np.log2(1 - p)
    return np.where((p > 0) & (p < 1), terms, 0.0)


def coarser(histogram: Int[np.ndarray, "features bins"], precision: int) -> np.ndarray:
    """The fine histogram (under- and overflow bins at the ends) at `precision` bins per
    decade."""
    factor = HISTOGRAM_BINS_PER_DECADE // precision
    inner = histogram[:, 1:-1]
    merged = inner.reshape(len(inner), -1, factor).sum(2)
    return np.concatenate([histogram[:, :1], merged, histogram[:, -1:]], axis=1)


def description_lengths(
    histogram: Int[np.ndarray, "features bins"],
    frequency: Float[np.ndarray, " features"],
    precision: int,
) -> Float[np.ndarray, " features"]:
    """DL_i in bits per token, for every latent."""
    return by_row_blocks(
        lambda counts, p: binary_entropy_bits(p) + p * entropy_bits(coarser(counts, precision)),
        histogram,
        frequency,
    )


def quantise(values: Float[Tensor, " n"], precision: int) -> Float[Tensor, " n"]:
    """Each active value replaced by the geometric centre of its bin at `precision` bins per
    decade (values beyond the histogram's range, and zeros, are kept)."""
    log = torch.log10(values.double())
    centre = 10.0 ** ((torch.floor(log * precision) + 0.5) / precision)
    inside = (log >= HISTOGRAM_LOG10_MIN) & (log < HISTOGRAM_LOG10_MAX)
    return torch.where(inside, centre, values.double()).to(values.dtype)


def effective_precision(mse_at: Callable[[int | None], float]) -> int:
    """The coarsest precision whose quantised reconstruction's MSE (`mse_at(precision)`) is
    within MSE_TOLERANCE of the unquantised one (`mse_at(None)`)."""
    allowed = mse_at(None) * (1 + MSE_TOLERANCE)
    return next((p for p in PRECISIONS if mse_at(p) <= allowed), PRECISIONS[-1])
