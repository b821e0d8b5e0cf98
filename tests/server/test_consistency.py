"""Consistency across runs: the latents that recur in every run but have no match in the
reference, against best cosines computed here from the SAEs' own weights."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from saescope.server.app import create_app
from saescope.server.settings import Settings
from tests.conftest import HOOK
from tests.server.test_server import assert_error

SAE, OTHER, THIRD = "tiny-sae", "other-sae", "third-sae"
# The third SAE is the dashboard SAE with these decoder rows turned to random directions: the
# dashboard SAE's latents 24..39 recur in both others, 0..23 only in the third.
THIRD_REPLACED = slice(40, 64)
THRESHOLD = 0.7


@pytest.fixture(scope="module")
def third_sae_dir(tmp_path_factory, dashboard_sae_dir: Path) -> Path:
    import torch
    from sae_lens import SAE as LoadedSae

    sae = LoadedSae.load_from_disk(dashboard_sae_dir)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        rows = torch.randn(sae.W_dec[THIRD_REPLACED].shape, generator=generator)
        sae.W_dec[THIRD_REPLACED] = rows / rows.norm(dim=1, keepdim=True)
        sae.W_enc[:, THIRD_REPLACED] = sae.W_dec[THIRD_REPLACED].T
    directory = tmp_path_factory.mktemp("third_sae") / THIRD
    sae.save_model(directory)
    return directory


@pytest.fixture(scope="module")
def database(tmp_path_factory, dashboard_db: Path, tiny_model_dir, dashboard_corpus, third_sae_dir):
    from click.testing import CliRunner

    from saescope.cli import app

    out = tmp_path_factory.mktemp("consistency") / "three.db"
    shutil.copy(dashboard_db, out)
    args = [
        "build", "--model", str(tiny_model_dir), "--hook", HOOK, "--sae", str(third_sae_dir),
        "--corpus", str(dashboard_corpus), "--out", str(out), "--n-tokens", "1024",
        "--context-length", "32", "--eval-sequences", "4", "--quiet",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def client(database: Path) -> TestClient:
    return TestClient(create_app(Settings(database=database)))


@pytest.fixture(scope="module")
def decoders(database: Path, dashboard_sae_dir, other_dashboard_sae_dir, third_sae_dir):
    """Each SAE's unit decoder rows (from its weights) and which of its latents are live (from
    the file)."""
    from safetensors.numpy import load_file

    with sqlite3.connect(database) as connection:
        live = connection.execute(
            "SELECT s.name, f.feature_index FROM features f JOIN saes s ON s.id = f.sae_id "
            "WHERE f.count > 0"
        ).fetchall()
    result = {}
    for name, directory in (
        (SAE, dashboard_sae_dir),
        (OTHER, other_dashboard_sae_dir),
        (THIRD, third_sae_dir),
    ):
        rows = load_file(directory / "sae_weights.safetensors")["W_dec"].astype(np.float64)
        mask = np.zeros(len(rows), bool)
        mask[[index for sae, index in live if sae == name]] = True
        result[name] = (rows / np.linalg.norm(rows, axis=1, keepdims=True), mask)
    return result


def best_cosines(decoders, sae: str, other: str) -> np.ndarray:
    rows, _ = decoders[sae]
    other_rows, other_live = decoders[other]
    return (rows @ other_rows[other_live].T).max(1)


def pages(client: TestClient, query: str) -> tuple[dict, list[dict]]:
    """The first page and every latent over all pages (three per page)."""
    first = body = client.get(f"{query}&limit=3").json()
    latents = list(body["latents"])
    while body["next_cursor"]:
        body = client.get(f"{query}&limit=3&after={body['next_cursor']}").json()
        latents += body["latents"]
    return first, latents


def clear_of_threshold(*cosines: np.ndarray) -> np.ndarray:
    """Latents whose cosines are not within the stored float16 decoders' error of it."""
    return np.all([np.abs(c - THRESHOLD) > 2e-3 for c in cosines], axis=0)


def test_latents_recurring_in_the_runs_without_a_match_in_the_reference(
    client: TestClient, decoders
) -> None:
    in_third = best_cosines(decoders, SAE, THIRD)
    in_other = best_cosines(decoders, SAE, OTHER)
    live = decoders[SAE][1]
    clear = clear_of_threshold(in_third, in_other)
    first, latents = pages(
        client,
        f"/api/v1/saes/{SAE}/consistency?runs={THIRD}&reference={OTHER}&threshold={THRESHOLD}",
    )
    listed = {latent["feature_index"] for latent in latents}
    expected = live & (in_third >= THRESHOLD) & (in_other < THRESHOLD)
    assert listed & set(np.flatnonzero(clear)) == set(np.flatnonzero(expected & clear))
    assert set(np.flatnonzero(expected)) <= set(range(24)), "only rows the other SAE replaced"
    assert len(listed) == first["count"] > 0
    assert first["recurring"] == pytest.approx(np.sum(live & (in_third >= THRESHOLD)), abs=1)
    assert first["live_latents"] == live.sum()
    assert first["threshold_above_chance"] is True
    frequencies = [latent["frequency"] for latent in latents]
    assert frequencies == sorted(frequencies, reverse=True)
    for latent in latents:
        (run,), (reference,) = latent["in_runs"], latent["in_reference"]
        index = latent["feature_index"]
        assert run["sae"] == THIRD and run["cosine"] == pytest.approx(in_third[index], abs=2e-3)
        assert reference["cosine"] == pytest.approx(in_other[index], abs=2e-3)


def test_the_other_way_lists_reference_latents_in_none_of_the_runs(
    client: TestClient, decoders
) -> None:
    in_sae = best_cosines(decoders, OTHER, SAE)
    in_third = best_cosines(decoders, OTHER, THIRD)
    live = decoders[OTHER][1]
    first, latents = pages(
        client,
        f"/api/v1/saes/{OTHER}/consistency?reference={SAE}&reference={THIRD}"
        f"&threshold={THRESHOLD}&sort=feature_index&order=asc",
    )
    listed = [latent["feature_index"] for latent in latents]
    assert listed == sorted(listed)
    clear = clear_of_threshold(in_sae, in_third)
    expected = live & (in_sae < THRESHOLD) & (in_third < THRESHOLD)
    assert set(listed) & set(np.flatnonzero(clear)) == set(np.flatnonzero(expected & clear))
    assert first["recurring"] == live.sum(), "with one run, every live latent recurs"


def test_the_pages_link_both_ways(client: TestClient) -> None:
    side_by_side = client.get("/api/v1/compare").json()
    assert side_by_side["consistency"] == [], "random SAEs were not trained by saescope"
    page = client.get(f"/saes/{SAE}/consistency?runs={THIRD}&reference={OTHER}")
    assert page.status_code == 200
    assert f"/saes/{OTHER}/consistency?runs=&amp;" not in page.text
    assert f"/saes/{OTHER}/consistency?reference={SAE}&amp;reference={THIRD}" in page.text


@pytest.mark.parametrize(
    ("query", "status", "fragment"),
    [
        (f"/api/v1/saes/{SAE}/consistency", 422, "reference"),
        (f"/api/v1/saes/{SAE}/consistency?reference={SAE}", 400, "once"),
        (f"/api/v1/saes/{SAE}/consistency?reference=nope", 404, "no SAE named 'nope'"),
        (f"/api/v1/saes/{SAE}/consistency?reference={OTHER}&threshold=2", 422, "threshold"),
        (f"/api/v1/saes/{SAE}/consistency?reference={OTHER}&after=x", 400, "cursor"),
    ],
)
def test_consistency_errors(client: TestClient, query: str, status: int, fragment: str) -> None:
    assert_error(client.get(query), status, fragment)
