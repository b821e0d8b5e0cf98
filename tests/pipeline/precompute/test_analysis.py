"""Per-feature analyses against independent computations on small hand-made tensors."""

import numpy as np
import pytest
import torch

from saescope.db.codec import HISTOGRAM_BINS, histogram_edges
from saescope.db.flags import FLAGS_BY_NAME, HIGH_FREQUENCY
from saescope.pipeline import saes
from saescope.pipeline.precompute import analysis
from saescope.pipeline.precompute.accumulators import AccumulatedResult
from saescope.pipeline.precompute.config import AnalysisSettings
from saescope.pipeline.precompute.kernels import top_per_group
from tests.pipeline.precompute.conftest import (
    CTX,
    D_MODEL,
    N_FEATURES,
    N_SEQ,
    SIZES,
    VOCAB,
    accumulate,
    masked,
    reference_top,
)


def test_statistics_and_flag_measures(data: dict, result: AccumulatedResult) -> None:
    """Frequency, BOS share and positional R² from the dense activations, by their definitions;
    the flags that read them pick the features those numbers say."""
    acts, _ = masked(data)  # special tokens zeroed: left out of every statistic
    special = data["special"].numpy()
    raw = data["feature_acts"].numpy()
    ordinary = ~special
    statistics = analysis.Statistics.of(result)

    count = (acts > 0).sum((0, 1))
    np.testing.assert_allclose(statistics.frequency, count / ordinary.sum())
    special_firings = (raw[special] > 0).sum(0)
    fired = count + special_firings
    expected_bos = np.divide(special_firings, fired, out=np.zeros(N_FEATURES), where=fired > 0)
    np.testing.assert_allclose(statistics.bos_share, expected_bos)
    assert expected_bos[4] > expected_bos[:4].max() and fired[5] == 0  # 4 fires on every BOS

    values = acts[ordinary].astype(np.float64)  # [tokens, features], zeros included
    positions = np.broadcast_to(np.arange(CTX), special.shape)[ordinary]
    mean = values.mean(0)
    between = np.zeros(N_FEATURES)
    for position in np.unique(positions):
        at = values[positions == position]
        between += len(at) * (at.mean(0) - mean) ** 2
    total = ((values - mean) ** 2).sum(0)
    expected_r2 = np.divide(between, total, out=np.zeros(N_FEATURES), where=total > 0)
    np.testing.assert_allclose(statistics.positional_r2, expected_r2, rtol=1e-9)

    columns = {
        "count": result.stats.count,
        "frequency": statistics.frequency,
        "bos_share": statistics.bos_share,
        "positional_r2": statistics.positional_r2,
    }
    assert FLAGS_BY_NAME["dead"].mask(columns).tolist() == (count == 0).tolist()
    assert FLAGS_BY_NAME["bos_dominated"].mask(columns).tolist() == (expected_bos > 0.5).tolist()
    assert FLAGS_BY_NAME["positional"].mask(columns).tolist() == (expected_r2 > 0.5).tolist()
    threshold = float(np.median(count / ordinary.sum()))
    high = HIGH_FREQUENCY.mask(columns, threshold)
    assert high.tolist() == (count / ordinary.sum() > threshold).tolist()
    assert 0 < high.sum() < N_FEATURES


def test_positional_and_bos_dominated_latents_are_flagged() -> None:
    """A latent that fires exactly at even positions has R² = 1, one that fires at random none
    to speak of; a latent that fires on every BOS and on one other token is BOS-dominated; one
    that fires on BOS alone is dead, and carries no other flag."""
    generator = torch.Generator().manual_seed(5)
    n_seq = 60
    tokens = torch.randint(1, VOCAB, (n_seq, CTX), generator=generator)
    tokens[:, 0] = 0
    feature_acts = torch.zeros(n_seq, CTX, N_FEATURES)
    feature_acts[:, 2::2, 0] = 3.0
    feature_acts[:, :, 1] = torch.rand(n_seq, CTX, generator=generator) * 2
    feature_acts[:, 0, 2] = 1.0
    feature_acts[0, 5, 2] = 1.0
    feature_acts[:, 0, 3] = 1.0
    data = {
        "feature_acts": feature_acts,
        "inputs": torch.randn(n_seq, CTX, D_MODEL, generator=generator),
        "tokens": tokens,
        "special": tokens == 0,
        "decoder": torch.randn(N_FEATURES, D_MODEL, generator=generator),
        "decoder_bias": torch.zeros(D_MODEL),
    }
    result = accumulate(data, range(n_seq), 7).finalize()
    statistics = analysis.Statistics.of(result)
    assert statistics.positional_r2[0] == pytest.approx(1.0)
    assert statistics.positional_r2[1] < 0.05
    assert statistics.bos_share[2] == pytest.approx(n_seq / (n_seq + 1))
    assert statistics.bos_share[3] == 1.0 and result.stats.count[3] == 0
    columns = {
        "count": result.stats.count,
        "frequency": statistics.frequency,
        "absorption_low": np.full(N_FEATURES, np.nan),  # not measurable in so small a sample
        "positional_r2": statistics.positional_r2,
        "bos_share": statistics.bos_share,
    }
    flagged = {name: FLAGS_BY_NAME[name].mask(columns).tolist()[:4] for name in FLAGS_BY_NAME}
    assert flagged["positional"] == [True, False, False, False]
    assert flagged["bos_dominated"] == [False, False, True, False]
    assert [name for name, held in flagged.items() if held[3]] == ["dead"]


def test_encoder_decoder_agreement(data: dict) -> None:
    """Jaccard of the brute-force top and decoder-top position sets; miss rate: the share of
    decoder-top positions where the feature is zero. The hook's activations are the decoder's
    reconstruction plus noise, so the two sets overlap in part."""
    generator = torch.Generator().manual_seed(4)
    noise = torch.randn(data["inputs"].shape, generator=generator)
    data = {**data, "inputs": data["feature_acts"] @ data["decoder"] + noise}
    result = accumulate(data, range(N_SEQ), 3).finalize()
    acts, projections = masked(data)
    top = reference_top(np.where(acts > 0, acts, -np.inf), SIZES.top)
    decoder_top = reference_top(projections, SIZES.decoder_top)
    jaccard, miss_rate = analysis.encoder_decoder_agreement(result)
    for feature in range(N_FEATURES):
        a, b = set(top[feature]), set(decoder_top[feature])
        assert jaccard[feature] == pytest.approx(len(a & b) / len(a | b) if a | b else 0.0)
        missed = [acts[s, p, feature] <= 0 for s, p in decoder_top[feature]]
        assert miss_rate[feature] == pytest.approx(np.mean(missed))
    assert miss_rate[5] == 1.0 and jaccard[5] == 0.0  # dead: every decoder-top position missed
    assert 0 < jaccard.max() < 1


def test_logit_effects_and_neighbours_against_dense_products() -> None:
    generator = torch.Generator().manual_seed(2)
    decoder = torch.randn(2500, 8, generator=generator)  # more than one chunk of 1024
    decoder[7] = decoder[3] * 2.5  # a neighbour at cosine 1
    unembed = torch.randn(8, 50, generator=generator)
    top_value, top_id, bottom_value, bottom_id = analysis.logit_effects(decoder, unembed, 4)
    logits = (decoder @ unembed).numpy()
    np.testing.assert_array_equal(top_id, np.argsort(-logits, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(top_value, -np.sort(-logits, axis=1)[:, :4], rtol=1e-5)
    np.testing.assert_array_equal(bottom_id, np.argsort(logits, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(bottom_value, np.sort(logits, axis=1)[:, :4], rtol=1e-5)

    cosine_value, cosine_id = analysis.decoder_neighbours(decoder, 3)
    unit = decoder / decoder.norm(dim=1, keepdim=True)
    cosine = (unit @ unit.T).numpy()
    np.fill_diagonal(cosine, -np.inf)
    # By value: latents 3 and 7 tie as anyone's neighbours.
    np.testing.assert_allclose(cosine_value, -np.sort(-cosine, axis=1)[:, :3], atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(cosine, cosine_id, 1), cosine_value, atol=1e-5)
    assert cosine_id[3, 0] == 7 and cosine_value[3, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("block_rows", [None, 7])
def test_quantile_edges_and_band_mass_match_the_per_feature_rule(monkeypatch, block_rows) -> None:
    if block_rows is not None:  # in blocks of 7 latents, as a wide SAE's are
        monkeypatch.setattr(saes.by_row_blocks, "__defaults__", (block_rows * HISTOGRAM_BINS,))
    rng = np.random.default_rng(0)
    finite = histogram_edges()
    n_bands = 5
    values = [rng.lognormal(rng.normal(), 1.5, size=rng.integers(1, 300)) for _ in range(30)]
    values[3] = np.zeros(0)  # never fired
    values[4] = np.full(7, 0.25)  # one bin
    histogram = np.stack([np.histogram(v, np.r_[0.0, finite, np.inf])[0] for v in values])
    low = np.array([v.min() if len(v) else 0.0 for v in values])
    high = np.array([v.max() if len(v) else 0.0 for v in values])

    edges = analysis.quantile_edges(histogram, low, high, n_bands)
    mass = analysis.band_mass(histogram, edges)

    assert np.isnan(edges[3]).all()
    # All values equal: one band, everything in it.
    assert edges[4, 0] == edges[4, -1] == np.float32(0.25) and np.isinf(edges[4, 1:-1]).all()
    assert mass[4].tolist() == [1.0] + [0.0] * (n_bands - 1)
    centres = np.r_[finite[0], np.sqrt(finite[:-1] * finite[1:]), finite[-1]]
    for i, v in enumerate(values):
        if len(set(v)) < 2:
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
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 6, size=500)
    groups[groups == 5] = 4  # group 5 empty
    scores = rng.integers(0, 20, size=500).astype(np.float64)  # many ties
    got = top_per_group(groups, scores, 7, 8)
    for group in range(7):
        members = np.flatnonzero(groups == group)
        expected = sorted(members, key=lambda i: (-scores[i], i))[:8]
        assert got[group].tolist() == expected + [-1] * (8 - len(expected))


def test_token_rankings_against_brute_force(data: dict, result: AccumulatedResult) -> None:
    """Each feature's most frequent and most specific tokens, and each token's most specific
    latents with their strongest firing, recomputed from the activations."""
    settings = AnalysisSettings(n_top_tokens=3, n_token_latents=2, min_token_firings=3)
    rankings = analysis.TokenRankings.of(result, settings)
    acts, _ = masked(data)
    tokens = data["tokens"].numpy()
    occurrences = np.bincount(tokens[tokens != 0], minlength=VOCAB)
    count = np.zeros((VOCAB, N_FEATURES), dtype=np.int64)
    total = np.zeros((VOCAB, N_FEATURES))
    for feature in range(N_FEATURES):
        np.add.at(count[:, feature], tokens, acts[:, :, feature] > 0)
        np.add.at(total[:, feature], tokens, acts[:, :, feature])
    mean_overall = acts.sum((0, 1)) / (tokens != 0).sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        specificity = total / np.maximum(occurrences, 1)[:, None] / mean_overall
    for feature in range(N_FEATURES):
        fired = np.flatnonzero(count[:, feature])
        by_count = sorted(fired, key=lambda t: (-count[t, feature], t))[:3]
        assert [t["token_id"] for t in rankings.top_tokens[feature]] == by_count
        eligible = [t for t in fired if count[t, feature] >= 3]
        specific = sorted(eligible, key=lambda t: (-specificity[t, feature], t))[:3]
        rows = rankings.specific_tokens[feature]
        assert [t["token_id"] for t in rows] == specific
        for row, token_id in zip(rows, specific, strict=True):
            assert row["count"] == count[token_id, feature]
            assert row["occurrences"] == occurrences[token_id]
            assert row["specificity"] == pytest.approx(specificity[token_id, feature], rel=1e-5)
            assert row["mean_activation"] == pytest.approx(
                total[token_id, feature] / count[token_id, feature], rel=1e-5
            )
    latents = rankings.token_latents
    flat_tokens, flat_acts = tokens.reshape(-1), acts.reshape(-1, N_FEATURES)
    for token_id in range(VOCAB):
        eligible = np.flatnonzero(count[token_id] >= 3)
        expected = sorted(eligible, key=lambda f: (-specificity[token_id, f], f))[:2]
        mine = np.flatnonzero(np.asarray(latents.token_id) == token_id)
        assert np.asarray(latents.rank)[mine].tolist() == list(range(len(expected)))
        assert np.asarray(latents.feature_index)[mine].tolist() == expected
        for row, feature in zip(mine, expected, strict=True):
            on_token = np.flatnonzero(flat_tokens == token_id)
            strongest = on_token[np.argmax(flat_acts[on_token, feature])]
            assert latents.sequence_index[row] * CTX + latents.position[row] == strongest
            assert latents.activation[row] == np.float32(flat_acts[strongest, feature])
    assert 5 not in np.asarray(latents.feature_index)  # the dead feature ranks nowhere
