"""Per-feature analyses against brute force on small tensors."""

import numpy as np
import pytest
import torch

from saescope.pipeline.build.absorption import ABSORPTION_MIN_FIRINGS, absorption

N, D_MODEL, N_FEATURES, N_ABSORBERS = 400, 6, 7, 3


def test_absorption_matches_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    # Absorbers from the first few missed positions only, so that the cut is exercised.
    monkeypatch.setattr("saescope.pipeline.build.absorption.ABSORBER_POSITIONS", 5)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(N, D_MODEL, generator=generator)
    encoder = torch.randn(D_MODEL, N_FEATURES, generator=generator)
    encoder_bias = torch.full((N_FEATURES,), -0.5)
    encoder_bias[-1] = -6.0  # fires too rarely to measure
    decoder = torch.randn(N_FEATURES, D_MODEL, generator=generator)
    decoder_bias = torch.randn(D_MODEL, generator=generator) * 0.1

    def encode(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ encoder + encoder_bias)

    # Small chunks exercise the per-chunk bookkeeping.
    got = absorption(inputs, encode, decoder, decoder_bias, N_ABSORBERS, features_per_chunk=3)

    acts = encode(inputs).numpy()
    dec = decoder.numpy()
    unit = dec / np.linalg.norm(dec, axis=1, keepdims=True)
    projection = (inputs - decoder_bias).numpy() @ unit.T
    assert (acts[:, -1] > 0).sum() < ABSORPTION_MIN_FIRINGS
    measured = most_missed = 0
    for i in range(N_FEATURES):
        fired = acts[:, i] > 0
        if fired.sum() < ABSORPTION_MIN_FIRINGS:
            assert np.isnan(got.present_miss_rate[i])
            assert got.present_positions[i] == 0 and got.absorbers[i] == []
            continue
        measured += 1
        present = projection[:, i] >= np.median(projection[fired, i])
        missed = present & ~fired
        assert got.present_positions[i] == present.sum()
        np.testing.assert_allclose(got.present_miss_rate[i], missed.sum() / present.sum())
        most_missed = max(most_missed, int(missed.sum()))
        examined = np.zeros_like(missed)
        examined[np.flatnonzero(missed)[:5]] = True
        weight = acts[examined].sum(0) * (dec @ unit[i])
        ranked = [j for j in np.argsort(-weight) if weight[j] > 0][:N_ABSORBERS]
        assert [a["feature_index"] for a in got.absorbers[i]] == ranked
        np.testing.assert_allclose(
            [a["weight"] for a in got.absorbers[i]], weight[ranked], rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            [a["share"] for a in got.absorbers[i]],
            weight[ranked] / projection[examined, i].sum(),
            rtol=1e-4,
            atol=1e-5,
        )
        assert [a["count"] for a in got.absorbers[i]] == [
            int((acts[examined, j] > 0).sum()) for j in ranked
        ]
    assert measured >= 4
    assert any(got.absorbers)
    assert most_missed > 5


def test_group_medians() -> None:
    from saescope.pipeline.build.absorption import group_medians

    values = torch.tensor([5.0, 1.0, 3.0, 2.0, 9.0, 4.0, 7.0])
    groups = torch.tensor([0, 0, 0, 2, 2, 2, 2])
    medians = group_medians(values, groups, 4)
    assert medians[0] == 3.0 and medians[2] == 5.5
    assert medians[1].isnan() and medians[3].isnan()
    assert group_medians(torch.zeros(0), torch.zeros(0, dtype=torch.int64), 2).isnan().all()


def test_grouped_order_sorts_by_group_then_key_keeping_ties_in_order() -> None:
    from saescope.pipeline.build.absorption import grouped_order

    groups = torch.tensor([1, 0, 1, 0, 1, 0])
    key = torch.tensor([-2.0, -5.0, -2.0, -1.0, -3.0, -5.0])
    assert grouped_order(groups, key).tolist() == [1, 5, 3, 4, 0, 2]


def test_quantile_edges_and_band_mass_match_the_per_feature_rule() -> None:
    from saescope.db.codec import histogram_edges
    from saescope.pipeline.build.analysis import band_mass, quantile_edges

    rng = np.random.default_rng(0)
    finite = histogram_edges()
    n_bands = 5
    values = [rng.lognormal(rng.normal(), 1.5, size=rng.integers(1, 300)) for _ in range(30)]
    values[3] = np.zeros(0)  # never fired
    values[4] = np.full(7, 0.25)  # one bin
    histogram = np.stack([np.histogram(v, np.r_[0.0, finite, np.inf])[0] for v in values])
    low = np.array([v.min() if len(v) else 0.0 for v in values])
    high = np.array([v.max() if len(v) else 0.0 for v in values])

    edges = quantile_edges(histogram, low, high, n_bands)
    mass = band_mass(histogram, edges)

    assert np.isnan(edges[3]).all()
    centres = np.r_[finite[0], np.sqrt(finite[:-1] * finite[1:]), finite[-1]]
    for i, v in enumerate(values):
        if not len(v):
            continue
        # Ends exact; each inner edge geometrically interpolated in the bin holding its quantile.
        assert edges[i, 0] == v.min() and edges[i, -1] == v.max()
        cumulative = np.cumsum(histogram[i])
        lower = np.clip(np.r_[v.min(), finite], v.min(), v.max())
        upper = np.clip(np.r_[finite, v.max()], v.min(), v.max())
        for band in range(1, n_bands):
            target = len(v) * band / n_bands
            b = np.searchsorted(cumulative, target)
            fraction = (target - cumulative[b] + histogram[i, b]) / histogram[i, b]
            expected = lower[b] * (upper[b] / lower[b]) ** fraction
            np.testing.assert_allclose(edges[i, band], expected, rtol=1e-12)
            assert lower[b] <= np.quantile(v, band / n_bands, method="inverted_cdf") <= upper[b]
        band_of_bin = np.searchsorted(edges[i, 1:-1], centres, side="right")
        per_band = np.bincount(band_of_bin, weights=histogram[i] * centres, minlength=n_bands)
        np.testing.assert_allclose(mass[i], per_band / per_band.sum(), rtol=1e-12)


def test_top_per_group_ranks_by_score_then_earlier_index() -> None:
    from saescope.pipeline.build.kernels import top_per_group

    rng = np.random.default_rng(1)
    groups = rng.integers(0, 6, size=500)
    groups[groups == 5] = 4  # group 5 empty
    scores = rng.integers(0, 20, size=500).astype(np.float64)  # many ties
    got = top_per_group(groups, scores, 7, 8)
    for group in range(7):
        members = np.flatnonzero(groups == group)
        expected = sorted(members, key=lambda i: (-scores[i], i))[:8]
        assert got[group].tolist() == expected + [-1] * (8 - len(expected))
