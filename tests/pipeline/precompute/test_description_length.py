"""Description length by hand on latents whose distributions are known, and the precision rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saescope.db.codec import HISTOGRAM_BINS, HISTOGRAM_BINS_PER_DECADE, HISTOGRAM_LOG10_MIN
from saescope.pipeline import saes
from saescope.pipeline.precompute.description_length import (
    MSE_TOLERANCE,
    PRECISIONS,
    description_lengths,
    effective_precision,
    quantise,
)


def fine_bin(value: float) -> int:
    """The fine histogram's bin of a positive value (bin 0 holds what lies below its range)."""
    return 1 + math.floor((math.log10(value) - HISTOGRAM_LOG10_MIN) * HISTOGRAM_BINS_PER_DECADE)


def histogram_of(*values_and_counts: tuple[float, int]) -> np.ndarray:
    row = np.zeros(HISTOGRAM_BINS, np.int64)
    for value, count in values_and_counts:
        row[fine_bin(value)] += count
    return row


def h(p: float) -> float:
    return -p * math.log2(p) - (1 - p) * math.log2(1 - p)


@pytest.mark.parametrize("block_rows", [None, 2])
def test_description_length_by_hand(monkeypatch, block_rows) -> None:
    """DL = H_b(p) + p·H(activations at the precision), by hand:
    a binary latent (one activation value) costs H_b(p), at most 1 bit whatever p;
    two equally likely values a decade apart cost one bit more where it fires;
    two values within one coarse bin cost nothing more at that precision, a bit at a finer one;
    a dead latent costs nothing. Also in blocks of 2 latents, as a wide SAE's are."""
    if block_rows is not None:
        monkeypatch.setattr(saes.by_row_blocks, "__defaults__", (block_rows * HISTOGRAM_BINS,))
    rows = np.stack(
        [
            histogram_of((3.0, 25)),  # binary, p = 0.25
            histogram_of((3.0, 50)),  # binary, p = 0.5: the most a binary latent costs
            histogram_of((0.3, 10), (3.0, 10)),  # p = 0.2, two values a decade apart
            histogram_of((1.05, 10), (1.15, 30)),  # p = 0.4, in one bin at 1 per decade
            np.zeros(HISTOGRAM_BINS, np.int64),
        ]
    )
    frequency = rows.sum(1) / 100
    coarse = description_lengths(rows, frequency, precision=1)
    fine = description_lengths(rows, frequency, precision=64)
    quarter = 0.25 * math.log2(4) + 0.75 * math.log2(4 / 3)
    np.testing.assert_allclose(coarse, [h(0.25), 1.0, h(0.2) + 0.2, h(0.4), 0.0])
    np.testing.assert_allclose(fine, [h(0.25), 1.0, h(0.2) + 0.2, h(0.4) + 0.4 * quarter, 0.0])
    assert coarse[:2].max() <= 1.0


def test_description_length_of_a_sampled_distribution() -> None:
    """An exponential latent: the plug-in entropy of its activations binned by hand at 4 bins
    per decade, from the samples themselves."""
    generator = np.random.default_rng(0)
    values = generator.exponential(size=5000) + 0.01
    row = np.zeros(HISTOGRAM_BINS, np.int64)
    np.add.at(row, [fine_bin(v) for v in values], 1)
    coarse_bins = np.floor(np.log10(values) * 4).astype(int)
    _, counts = np.unique(coarse_bins, return_counts=True)
    share = counts / counts.sum()
    expected = h(0.05) + 0.05 * -(share * np.log2(share)).sum()
    (found,) = description_lengths(row[None], np.array([0.05]), precision=4)
    assert found == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantise_sends_each_value_to_its_bins_centre(precision: int) -> None:
    """Within half a bin of itself (relative), to the same value for two values in one bin,
    zeros kept."""
    generator = torch.Generator().manual_seed(0)
    f = torch.rand(50, 30, generator=generator) * 20
    f[f < 5] = 0
    quantised = quantise(f, precision)
    active = f > 0
    assert torch.equal(quantised > 0, active)
    ratio = quantised[active].double() / f[active].double()
    half_bin = 10 ** (0.5 / precision)
    assert ratio.max() <= half_bin * (1 + 1e-6) and ratio.min() >= 1 / half_bin * (1 - 1e-6)
    bins = torch.floor(torch.log10(f[active].double()) * precision)
    for b in bins.unique():
        assert quantised[active][bins == b].unique().numel() == 1


def test_the_precision_is_the_coarsest_within_the_tolerance() -> None:
    """MSE falls as the precision refines: the first within 5% of the unquantised MSE wins; none
    within it gives the finest."""
    mse = {None: 1.0, 1: 2.0, 2: 1.3, 4: 1.0 + MSE_TOLERANCE, 8: 1.01, 16: 1.0, 32: 1.0, 64: 1.0}
    assert effective_precision(mse.__getitem__) == 4
    assert effective_precision(lambda p: 1.0 if p is None else 9.0) == PRECISIONS[-1]
