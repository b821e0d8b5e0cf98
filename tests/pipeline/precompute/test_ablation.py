"""Threshold ablation: the stored curves of the dashboard SAE against the rules applied by hand
with the model, and the pieces against brute force."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from saescope.pipeline.activations import open_source
from saescope.pipeline.config import SourceConfig
from saescope.pipeline.models import activations_at_hook
from saescope.pipeline.precompute.ablation import (
    RULES,
    TARGET_FRACTIONS,
    ActivationRanks,
    _drop_lowest,
)
from saescope.pipeline.precompute.accumulators import FeatureStatsResult
from saescope.pipeline.precompute.analysis import interpolated_quantiles
from saescope.pipeline.precompute.evaluation import ActiveEntries
from saescope.pipeline.saes import load_sae, sae_metadata
from tests.conftest import HOOK

EVAL_SEQUENCES = 4  # as the dashboard database was built


@pytest.fixture(scope="module")
def stored(dashboard_db: Path) -> dict:
    with sqlite3.connect(dashboard_db) as connection:
        mse, variance, ce, tokens, ablation = connection.execute(
            "select mse, explained_variance, ce_sae, eval_tokens, threshold_ablation from saes "
            "where name = 'tiny-sae'"
        ).fetchone()
        maximum = connection.execute(
            "select max_activation from features where sae_id = 1 order by feature_index"
        ).fetchall()
    rules = {rule["name"]: rule for rule in json.loads(ablation)}
    return {"mse": mse, "explained_variance": variance, "ce": ce, "eval_tokens": tokens,
            "rules": rules, "max": torch.tensor([m for (m,) in maximum])}  # fmt: skip


@pytest.fixture(scope="module")
def model_and_sae(tiny_model_dir: Path, dashboard_sae_dir: Path, dashboard_corpus: Path):
    sae = load_sae(dashboard_sae_dir, None, None, "cpu", "float32")
    config = SourceConfig(
        model=str(tiny_model_dir), hook=HOOK, corpus=str(dashboard_corpus), n_tokens=1024,
        context_length=32,
    )  # fmt: skip
    source = open_source(config, sae_metadata(sae), torch.float32, 32, quiet=True)
    return source, sae


def by_hand(source, sae, keep, sequences: int | list[int] = EVAL_SEQUENCES) -> dict[str, float]:
    """L0, MSE, explained variance and CE with `keep(f)` decoded instead of f, special tokens
    untouched, on the first contexts (or those listed): computed here from the model, in one
    batch."""
    chosen = list(range(sequences)) if isinstance(sequences, int) else sequences
    tokens = torch.from_numpy(source.tokens[chosen])
    special = source.special(tokens)
    model = source.language_model
    with torch.no_grad():
        x = activations_at_hook(model, HOOK, tokens).float()[~special]
        f = keep(sae.encode(x))
        reconstruction = sae.decode(f)
        error = (reconstruction - x).double().pow(2)

        def splice(activation, hook):
            activation = activation.clone()
            activation[~special] = reconstruction
            return activation

        ce = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(HOOK, splice)])
    return {
        "l0": float((f > 0).sum(1).double().mean()),
        "mse": float(error.mean()),
        "explained_variance": float(
            1 - error.sum() / (x.double() - x.double().mean(0)).pow(2).sum()
        ),
        "ce": float(ce),
    }


def test_every_rule_starts_at_the_sae_itself(stored: dict, model_and_sae) -> None:
    """Knob 0 is the SAE: its MSE, explained variance and CE are the SAE's evaluation figures,
    its L0 that of the evaluation contexts (computed here)."""
    source, sae = model_and_sae
    own = by_hand(source, sae, lambda f: f)
    assert stored["eval_tokens"] > 0 and list(stored["rules"]) == list(RULES)
    for rule in stored["rules"].values():
        first = rule["points"][0]
        assert first["threshold"] == 0
        assert first["mse"] == pytest.approx(stored["mse"], rel=1e-9)
        assert first["explained_variance"] == pytest.approx(stored["explained_variance"], rel=1e-9)
        assert first["ce"] == pytest.approx(stored["ce"], rel=1e-9)
        for key in ("l0", "mse", "explained_variance", "ce"):
            assert first[key] == pytest.approx(own[key], rel=1e-4), key


def test_each_rules_points_are_what_the_rule_gives_by_hand(stored: dict, model_and_sae) -> None:
    """Each point of the global, lowest-k and fraction-of-max rules, recomputed from its knob
    with the model; each rule lowers L0 towards its targets, and the knob-0 L0 times each target
    fraction is reached within a token's worth."""
    source, sae = model_and_sae
    maximum = stored["max"]

    def lowest_k(k: int):
        def keep(f):
            kept = f.clone()
            for row in kept:
                active = torch.nonzero(row > 0).flatten()
                row[active[row[active].argsort()[:k]]] = 0
            return kept

        return keep

    rules = {
        "global": lambda knob: lambda f: torch.where(f >= knob, f, 0.0),
        "lowest_k": lambda knob: lowest_k(int(knob)),
        "fraction_of_max": lambda knob: lambda f: torch.where(f >= knob * maximum, f, 0.0),
    }
    for name, rule in rules.items():
        points = stored["rules"][name]["points"]
        assert len(points) == len(TARGET_FRACTIONS)
        l0 = [point["l0"] for point in points]
        assert l0 == sorted(l0, reverse=True) and l0[-1] < l0[0]
        for point in points[1:]:
            expected = by_hand(source, sae, rule(point["threshold"]))
            for key in ("l0", "mse", "explained_variance", "ce"):
                assert point[key] == pytest.approx(expected[key], rel=1e-4), (name, key)
    for name in ("global", "fraction_of_max", "quantile"):
        points = stored["rules"][name]["points"]
        tokens = stored["eval_tokens"]
        for point, fraction in zip(points, TARGET_FRACTIONS, strict=True):
            assert point["l0"] == pytest.approx(points[0]["l0"] * fraction, abs=2 / tokens), name


def test_dropping_the_lowest_k_against_sorting() -> None:
    generator = torch.Generator().manual_seed(0)
    f = torch.rand(40, 12, generator=generator)
    f[f < 0.5] = 0
    f[3, :4] = f[3, 5]  # ties with the k-th smallest go with it
    f[7] = 0  # a row with nothing active
    for k in (0, 1, 3, 12):
        expected = f.clone()
        for row in expected:
            active = torch.nonzero(row > 0).flatten()
            row[active[row[active].argsort()[:k]]] = 0
        active = ActiveEntries.of(f)
        kept = torch.zeros_like(f)
        kept[active.rows, active.latents] = _drop_lowest(active, k)
        assert torch.equal(kept, expected)


def test_activation_ranks_are_the_distribution_of_the_pass() -> None:
    """F_i(v) from the fine histogram: within the widest bin's share of the empirical CDF of the
    values the histogram counts, and the inverse of the interpolated quantiles."""
    from saescope.db.codec import HISTOGRAM_BINS, histogram_edges

    generator = np.random.default_rng(0)
    samples = [generator.exponential(size=2000) + 0.05, generator.lognormal(size=3000)]
    histogram = np.zeros((2, HISTOGRAM_BINS), np.int64)
    for i, values in enumerate(samples):
        np.add.at(histogram[i], np.searchsorted(histogram_edges(), values, side="right"), 1)
    empty = np.zeros(2)
    stats = FeatureStatsResult(
        tokens_seen=10_000, special_tokens_seen=0, count=histogram.sum(1), sum=empty,
        sum_sq=empty, max=np.array([v.max() for v in samples]),
        min=np.array([v.min() for v in samples]), special_count=empty, position_tokens=empty,
        position_count=empty, position_sum=empty, histogram=histogram,
    )  # fmt: skip
    ranks = ActivationRanks(stats)
    for i, values in enumerate(samples):
        probe = np.quantile(values, np.linspace(0.01, 0.99, 50))
        empirical = np.searchsorted(np.sort(values), probe) / len(values)
        found = ranks.of(np.full(len(probe), i), probe)
        widest = histogram[i].max() / histogram[i].sum()
        assert np.abs(found - empirical).max() <= widest
    levels = np.linspace(0.05, 0.95, 19)
    quantiles = interpolated_quantiles(histogram, stats.min, stats.max, levels)
    for i in range(2):
        np.testing.assert_allclose(ranks.of(np.full(19, i), quantiles[i]), levels, atol=1e-9)
    entries = ranks.of_entries(ActiveEntries.of(torch.tensor([[0.0, 1.0], [2.0, 0.0]])))
    assert entries.tolist() == pytest.approx(ranks.of(np.array([1, 0]), np.array([1.0, 2.0])))


def test_the_sae_row_is_measured_on_the_evaluation_tokens_with_its_errors(
    dashboard_db: Path, model_and_sae
) -> None:
    """The row's L0 beside MSE, explained variance and CE is the evaluation tokens' (the corpus
    L0 apart); each standard error is the spread of the metric recomputed by hand with each
    evaluation context left out (the jackknife), and CE clean's is the classic std/√n."""
    source, sae = model_and_sae
    model = source.language_model
    with sqlite3.connect(dashboard_db) as connection:
        connection.row_factory = sqlite3.Row
        row = dict(connection.execute("select * from saes where name = 'tiny-sae'").fetchone())
    own = by_hand(source, sae, lambda f: f)
    assert row["eval_l0"] == pytest.approx(own["l0"], rel=1e-9)
    assert row["eval_sequences"] == EVAL_SEQUENCES and row["l0"] != row["eval_l0"]

    def ce_score(sequences: list[int]) -> float:
        tokens = torch.from_numpy(source.tokens[sequences])
        special = source.special(tokens)

        def zero(activation, hook):
            return torch.where(special[..., None], activation, 0.0)

        with torch.no_grad():
            clean = float(model(tokens, return_type="loss"))
            zeroed = float(
                model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(HOOK, zero)])
            )
        spliced = by_hand(source, sae, lambda f: f, sequences)["ce"]
        return (zeroed - spliced) / (zeroed - clean)

    everything = list(range(EVAL_SEQUENCES))
    # A small gap (a random model) amplifies float32 rounding: 1e-4.
    assert row["ce_score"] == pytest.approx(ce_score(everything), rel=1e-4)
    left_out = np.array([ce_score([s for s in everything if s != out]) for out in everything])
    n = EVAL_SEQUENCES
    jackknife = np.sqrt((n - 1) / n * ((left_out - left_out.mean()) ** 2).sum())
    assert row["ce_score_se"] == pytest.approx(jackknife, rel=1e-4)
    tokens = torch.from_numpy(source.tokens[:n])
    with torch.no_grad():
        per_sequence = model(tokens, return_type="loss", loss_per_token=True).double().mean(1)
    assert row["ce_clean"] == pytest.approx(float(per_sequence.mean()), rel=1e-6)
    assert row["ce_clean_se"] == pytest.approx(float(per_sequence.std() / np.sqrt(n)), rel=1e-5)
    for name in ("eval_l0", "mse", "explained_variance", "ce_sae", "ce_zero"):
        assert row[f"{name}_se"] > 0, name
