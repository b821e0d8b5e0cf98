"""Reference matching against a brute-force cosine matrix, through the chunks and the database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from saescope.cli import app
from saescope.db.codec import COSINE_BINS
from saescope.db.records import StoredDecoder
from saescope.pipeline.precompute import matching
from saescope.pipeline.precompute.matching import best_matches, compare_both_ways


def brute_force(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Every cosine between the rows of a and those of b, in float64."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a.astype(np.float64) @ b.astype(np.float64).T


def decoder(name: str, rows: np.ndarray, live: np.ndarray | None = None) -> StoredDecoder:
    live = np.ones(len(rows), bool) if live is None else live
    return StoredDecoder(name=name, model="m", hook="h", decoder=rows, live=live)


@pytest.mark.parametrize("chunk_cells", [7, 50, 1 << 24])
def test_best_matches_equal_the_cosine_matrix(monkeypatch, chunk_cells: int) -> None:
    """Whatever the chunking (7 cells: one row per chunk), each row's best live match and its
    cosine, both ways, are those of the full cosine matrix."""
    monkeypatch.setattr(matching, "CHUNK_CELLS", chunk_cells)
    generator = np.random.default_rng(0)
    a = generator.normal(size=(37, 16)).astype(np.float32)
    b = generator.normal(size=(23, 16)).astype(np.float32) * generator.uniform(0.1, 5, (23, 1))
    live_a, live_b = generator.uniform(size=37) < 0.8, generator.uniform(size=23) < 0.8
    forward, back = best_matches(*(torch.from_numpy(x) for x in (a, b, live_a, live_b)))
    cosines = brute_force(a, b)
    for (index, cosine), matrix, live in ((forward, cosines, live_b), (back, cosines.T, live_a)):
        among_live = np.where(live[None, :], matrix, -np.inf)
        np.testing.assert_array_equal(index.numpy(), among_live.argmax(1))
        np.testing.assert_allclose(cosine.numpy(), among_live.max(1), atol=1e-6)


def test_the_summary_counts_live_latents_matched_among_live_ones() -> None:
    """Shares, median and histogram over the live latents of A, each matched among the live
    latents of B only, from the brute-force matrix; A's row 0 is B's row 5 (cosine 1), but B's
    row 5 is dead, so it does not count."""
    generator = np.random.default_rng(1)
    b = generator.normal(size=(40, 8)).astype(np.float32)
    a = generator.normal(size=(30, 8)).astype(np.float32)
    a[1:10] = b[10:19] + 0.05 * generator.normal(size=(9, 8))  # close copies: cosine > 0.9
    a[0] = b[5]
    live_a, live_b = np.ones(30, bool), np.ones(40, bool)
    live_a[25:], live_b[5] = False, False
    record, reverse = compare_both_ways(decoder("a", a, live_a), decoder("b", b, live_b))

    cosines = brute_force(a, b)[:, live_b]
    best = cosines.max(1)
    np.testing.assert_array_equal(
        record.matches.other_feature_index, np.flatnonzero(live_b)[cosines.argmax(1)]
    )
    np.testing.assert_allclose(record.matches.cosine, best, atol=1e-6)
    summarised = best[live_a]
    assert record.latents == 25
    assert record.share_above_0_9 == pytest.approx(np.mean(summarised > 0.9))
    assert record.share_above_0_8 == pytest.approx(np.mean(summarised > 0.8))
    assert record.median_best_cosine == pytest.approx(np.median(summarised), abs=1e-6)
    assert record.share_above_0_9 >= 9 / 25 and best[0] < 0.99
    expected, _ = np.histogram(np.clip(summarised, 0, 1), bins=COSINE_BINS, range=(0, 1))
    np.testing.assert_array_equal(record.histogram_counts, expected)
    assert record.same_model_and_hook
    back = brute_force(b, a)[:, live_a]
    np.testing.assert_array_equal(
        reverse.matches.other_feature_index, np.flatnonzero(live_a)[back.argmax(1)]
    )
    assert reverse.latents == 39
    assert reverse.median_best_cosine == pytest.approx(np.median(back.max(1)[live_b]), abs=1e-6)


def test_an_sae_without_live_latents_matches_nothing() -> None:
    rows = np.eye(4, dtype=np.float32)
    record, reverse = compare_both_ways(decoder("a", rows), decoder("b", rows, np.zeros(4, bool)))
    assert record.share_above_0_9 == 0 and record.median_best_cosine == 0
    assert len(record.matches.feature_index) == 0
    assert reverse.latents == 0 and len(reverse.matches.feature_index) == 4
    np.testing.assert_array_equal(reverse.matches.other_feature_index, np.arange(4))


def stored_matching(path: Path) -> tuple[dict, dict]:
    """The comparisons in a file: summaries and matches ({latent: (closest, cosine)}), by
    (SAE, other SAE) name."""
    with sqlite3.connect(path) as connection:
        names = dict(connection.execute("select id, name from saes"))
        summaries = {
            (names[sae], names[other]): rest
            for sae, other, *rest in connection.execute(
                "select sae_id, other_sae_id, latents, share_above_0_9, share_above_0_8, "
                "median_best_cosine, same_model_and_hook from comparisons"
            )
        }
        matches: dict = {}
        for sae, other, latent, closest, cosine in connection.execute(
            "select sae_id, other_sae_id, feature_index, other_feature_index, cosine from matches"
        ):
            matches.setdefault((names[sae], names[other]), {})[latent] = (closest, cosine)
    return summaries, matches


def live_latents(path: Path, name: str) -> np.ndarray:
    with sqlite3.connect(path) as connection:
        counts = connection.execute(
            "select count from features join saes on saes.id = sae_id where name = ? "
            "order by feature_index",
            (name,),
        ).fetchall()
    return np.array([count > 0 for (count,) in counts])


def test_the_build_stores_the_matching_of_the_stored_decoders(
    dashboard_db: Path, dashboard_sae_dir: Path, other_dashboard_sae_dir: Path
) -> None:
    """The dashboard file's two SAEs are compared at build time, each way, as the brute-force
    matrix of their decoders (stored in float16) says; the latents the other SAE kept match
    themselves."""
    from safetensors.numpy import load_file

    from tests.conftest import REPLACED_ROWS

    summaries, matches = stored_matching(dashboard_db)
    assert set(summaries) == set(matches) == {("tiny-sae", "other-sae"), ("other-sae", "tiny-sae")}
    tiny, other = (
        load_file(directory / "sae_weights.safetensors")["W_dec"].astype(np.float16)
        for directory in (dashboard_sae_dir, other_dashboard_sae_dir)
    )
    live_tiny, live_other = (
        live_latents(dashboard_db, "tiny-sae"),
        live_latents(dashboard_db, "other-sae"),
    )
    cosines = brute_force(tiny, other)[:, live_other]
    closest = np.flatnonzero(live_other)[cosines.argmax(1)]
    found = matches[("tiny-sae", "other-sae")]
    assert [found[i][0] for i in range(64)] == closest.tolist()
    np.testing.assert_allclose([found[i][1] for i in range(64)], cosines.max(1), atol=2e-3)
    kept = [i for i in range(REPLACED_ROWS.stop, 64) if live_tiny[i] and live_other[i]]
    assert kept and all(found[i] == (i, pytest.approx(1.0, abs=2e-3)) for i in kept)
    latents, above_0_9, above_0_8, median, same = summaries[("tiny-sae", "other-sae")]
    best = cosines.max(1)[live_tiny]
    assert latents == live_tiny.sum() and same == 1
    assert above_0_9 == pytest.approx(np.mean(best > 0.9))
    assert above_0_8 == pytest.approx(np.mean(best > 0.8))
    assert median == pytest.approx(np.median(best), abs=2e-3)


def test_the_command_stores_what_the_build_does(dashboard_db: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.db"
    copy.write_bytes(dashboard_db.read_bytes())
    with sqlite3.connect(copy) as connection:
        connection.execute("delete from comparisons")
        connection.execute("delete from matches")
    result = CliRunner().invoke(app, ["compare", str(copy), "tiny-sae", "other-sae"])
    assert result.exit_code == 0, result.output
    assert "tiny-sae in other-sae:" in result.output
    assert stored_matching(copy) == stored_matching(dashboard_db)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["tiny-sae", "nope"], "holds no SAE named 'nope' (it holds: tiny-sae, narrow)"),
        (["tiny-sae", "tiny-sae"], "not with itself"),
        (["tiny-sae", "narrow"], "read activations of different widths (32 and 16)"),
    ],
)
def test_compare_refuses_what_it_cannot_compare(
    dashboard_db: Path, tmp_path: Path, names: list[str], message: str
) -> None:
    """Nothing is written: the file stays byte for byte as it was."""
    copy = tmp_path / "copy.db"
    copy.write_bytes(dashboard_db.read_bytes())
    with sqlite3.connect(copy) as connection:
        connection.execute("update saes set name = 'narrow', d_in = 16 where name = 'other-sae'")
    before = copy.read_bytes()
    result = CliRunner().invoke(app, ["compare", str(copy), *names])
    assert result.exit_code == 2 and message in result.output
    assert copy.read_bytes() == before


def test_the_chance_baseline_is_what_random_decoders_give() -> None:
    """The stored chance figures against an independent simulation (other random numbers) of
    random unit decoders of the live shapes; two unrelated random SAEs have about one latent
    above chance's highest, planted copies many."""
    from saescope.db.queries.comparisons import CHANCE_COUNT

    generator = np.random.default_rng(7)
    a = generator.normal(size=(600, 48)).astype(np.float32)
    b = generator.normal(size=(900, 48)).astype(np.float32)
    live_a, live_b = generator.uniform(size=600) < 0.9, generator.uniform(size=900) < 0.8
    record, reverse = compare_both_ways(decoder("a", a, live_a), decoder("b", b, live_b))
    simulated = generator.normal(size=(live_a.sum(), 48)), generator.normal(size=(live_b.sum(), 48))
    best = brute_force(*simulated).max(1)
    assert record.chance_median_best_cosine == pytest.approx(np.median(best), abs=0.01)
    assert record.chance_max_cosine == pytest.approx(best.max(), abs=0.05)
    assert sum(record.chance_histogram_counts) == live_a.sum()
    assert sum(reverse.chance_histogram_counts) == live_b.sum()
    assert record.median_best_cosine == pytest.approx(record.chance_median_best_cosine, abs=0.02)
    assert record.latents_above_chance <= CHANCE_COUNT
    a[:150] = b[:150] + 0.2 * generator.normal(size=(150, 48))
    planted, _ = compare_both_ways(decoder("a", a, live_a), decoder("b", b, live_b))
    assert planted.latents_above_chance > 100  # the planted copies that are live in both
