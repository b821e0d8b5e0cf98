"""The absorption measure against brute force on small tensors."""

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
