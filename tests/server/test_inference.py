""" "Test your text": the dashboard forwards text to the inference process (`saescope infer`),
which runs the model and SAE the database was built from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from saescope.db.activations import MAX_TEXT_TOKENS
from saescope.server.app import create_app
from saescope.server.settings import Settings
from tests.conftest import HOOK, TEXT, free_port, read_hooks

ROUTE = "/api/v1/saes/tiny-sae/activations"


@pytest.fixture(scope="module")
def client(dashboard_db: Path, inference_url: str) -> TestClient:
    return TestClient(create_app(Settings(database=dashboard_db, inference_url=inference_url)))


def expected_activations(tiny_model_dir: Path, dashboard_sae_dir: Path, token_ids: list[int]):
    """The SAE's activations on the tokens, computed here from the model and SAE directories."""
    sae, (x,) = read_hooks(tiny_model_dir, dashboard_sae_dir, (HOOK,), np.array([token_ids]))
    with torch.no_grad():
        return sae.encode(x[0])


def test_text_runs_through_the_inference_process(
    client: TestClient, tiny_model_dir: Path, dashboard_sae_dir: Path, busiest_feature: int
) -> None:
    response = client.post(ROUTE, json={"text": TEXT[:80], "features": [busiest_feature, 3]})
    assert response.status_code == 200, response.text
    result = response.json()
    ids = result["token_ids"]
    assert result["special"][0] and not any(result["special"][1:])  # BOS first
    assert "".join(result["tokens"][1:]) == TEXT[:80]
    f = expected_activations(tiny_model_dir, dashboard_sae_dir, ids)
    for asked in result["features"]:
        expected = f[:, asked["feature_index"]].tolist()
        assert asked["activations"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for token, listed in enumerate(result["top"]):
        values, indices = f[token].topk(5)
        expected = [(int(i), float(v)) for v, i in zip(values, indices, strict=True) if v > 0]
        got = [(latent["feature_index"], latent["activation"]) for latent in listed]
        assert [i for i, _ in got] == [i for i, _ in expected]
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5)


def test_refusals_come_back_with_their_reason(client: TestClient) -> None:
    outside = client.post(ROUTE, json={"text": "the cat", "features": [64]})
    assert outside.status_code == 422
    assert "latents 0 to 63" in outside.json()["error"]["message"]
    long = client.post(ROUTE, json={"text": "the cat sat " * MAX_TEXT_TOKENS})
    assert long.status_code == 422
    assert f"at most {MAX_TEXT_TOKENS}" in long.json()["error"]["message"]
    unknown = client.post("/api/v1/saes/no-such-sae/activations", json={"text": "the cat"})
    assert unknown.status_code == 404
    empty = client.post(ROUTE, json={"text": ""})
    assert empty.status_code == 422


def test_without_an_inference_process_the_box_says_how_to_start_one(dashboard_db: Path) -> None:
    unconnected = TestClient(create_app(Settings(database=dashboard_db)))
    response = unconnected.post(ROUTE, json={"text": "the cat"})
    assert response.status_code == 503
    assert "saescope infer" in response.json()["error"]["message"]
    page = unconnected.get("/saes/tiny-sae/features/3").text
    assert "Needs the inference process" in page and "saescope infer" in page
    gone = TestClient(
        create_app(Settings(database=dashboard_db, inference_url=f"http://127.0.0.1:{free_port()}"))
    )
    response = gone.post(ROUTE, json={"text": "the cat"})
    assert response.status_code == 503
    assert "does not answer" in response.json()["error"]["message"]


def test_token_ids_run_as_they_are(
    client: TestClient, tiny_model_dir: Path, dashboard_sae_dir: Path, vocab_size: int
) -> None:
    ids = client.post(ROUTE, json={"text": TEXT[:40]}).json()["token_ids"][1:]  # no BOS
    response = client.post(ROUTE, json={"token_ids": ids, "features": [5]})
    assert response.status_code == 200, response.text
    assert response.json()["token_ids"] == ids
    expected = expected_activations(tiny_model_dir, dashboard_sae_dir, ids)[:, 5].tolist()
    got = response.json()["features"][0]["activations"]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    both = client.post(ROUTE, json={"text": "the cat", "token_ids": ids})
    assert both.status_code == 422 and "either" in both.text
    outside = client.post(ROUTE, json={"token_ids": [1, vocab_size]})
    assert outside.status_code == 422
    assert f"token ids 0 to {vocab_size - 1}" in outside.json()["error"]["message"]


def test_windows_cover_a_long_text_with_half_a_context_before_each_token() -> None:
    from saescope.pipeline.inference import text_windows

    assert text_windows(64, 64, bos=0) == [(0, 0, 64)]
    for n_tokens, context, bos in [(65, 64, 0), (200, 64, 0), (1024, 128, None), (300, 10, 1)]:
        windows = text_windows(n_tokens, context, bos)
        read = [t for _, kept, end in windows for t in range(kept, end)]
        assert read == list(range(n_tokens)), "every token read once, in order"
        for start, kept, end in windows[1:]:
            assert end - start + (bos is not None) <= context, "a window fits the context"
            assert kept - start >= context // 2, "half a context of text before every token"


def test_a_text_longer_than_the_context_runs_in_windows(
    client: TestClient, tiny_model_dir: Path, dashboard_sae_dir: Path
) -> None:
    """Each token's activation is the model's on its window (BOS, then the text from the
    window's start), as computed here; the answer says how many windows ran."""
    from saescope.pipeline.inference import text_windows

    text = TEXT * 3
    result = client.post(ROUTE, json={"text": text, "features": [5, 9]}).json()
    ids = result["token_ids"]
    assert len(ids) > 128 and result["context_length"] == 64
    windows = text_windows(len(ids), 64, ids[0])
    assert result["windows"] == len(windows) >= 3
    bos = ids[0]
    for start, kept, end in windows:
        window = ids[start:end] if start == 0 else [bos, *ids[start:end]]
        f = expected_activations(tiny_model_dir, dashboard_sae_dir, window)
        offset = 0 if start == 0 else 1 - start
        for asked in result["features"]:
            got = asked["activations"][kept:end]
            expected = f[kept + offset : end + offset, asked["feature_index"]].tolist()
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_the_summary_ranks_the_latents_by_specificity_to_the_text(
    client: TestClient, tiny_model_dir: Path, dashboard_sae_dir: Path, dashboard_db: Path
) -> None:
    """Mean activation over the text's tokens (BOS left out) over the corpus mean, brute force;
    dense latents left out of the summary and of the top lists when asked."""
    import sqlite3

    with sqlite3.connect(dashboard_db) as connection:
        rows = connection.execute(
            "select feature_index, frequency, mean_activation from features where sae_id = "
            "(select id from saes where name = 'tiny-sae') order by feature_index"
        ).fetchall()
    frequency = np.array([row[1] for row in rows])
    corpus_mean = frequency * np.array([row[2] for row in rows])
    for max_frequency in (None, 0.1):
        body = {"text": TEXT[:80]} | ({"max_frequency": max_frequency} if max_frequency else {})
        result = client.post(ROUTE, json=body).json()
        f = expected_activations(tiny_model_dir, dashboard_sae_dir, result["token_ids"])[1:]
        f = f.numpy().astype(np.float64)
        if max_frequency:
            f[:, frequency > max_frequency] = 0.0
        fired = np.flatnonzero((f > 0).any(0))
        with np.errstate(divide="ignore", invalid="ignore"):
            specificity = f.mean(0) / corpus_mean
        expected = sorted(fired, key=lambda j: (-specificity[j], j))[:25]
        summary = result["summary"]
        assert [latent["feature_index"] for latent in summary] == expected
        for latent in summary:
            j = latent["feature_index"]
            assert latent["fires_on"] == (f[:, j] > 0).sum()
            assert latent["max_activation"] == pytest.approx(f[:, j].max(), rel=1e-5)
            if np.isfinite(specificity[j]):
                assert latent["specificity"] == pytest.approx(specificity[j], rel=1e-4)
            else:
                assert latent["specificity"] is None
        listed = {latent["feature_index"] for token in result["top"] for latent in token}
        assert all(frequency[j] <= (max_frequency or 1) for j in listed)
    assert (frequency > 0.1).any(), "the fixture has dense latents"


def test_the_inference_process_answers_every_error_as_json(dashboard_db: Path, monkeypatch) -> None:
    from saescope.pipeline.inference import Inference, inference_app

    def broken(self, name, request):
        raise IndexError("index out of range in self")

    monkeypatch.setattr(Inference, "run", broken)
    app = TestClient(inference_app(dashboard_db, "cpu"), raise_server_exceptions=False)
    response = app.post("/saes/tiny-sae/activations", json={"text": "the cat"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert "IndexError: index out of range" in response.json()["detail"]
    refused = app.post(
        "/saes/tiny-sae/spans", json={"sequences": [{"token_ids": [1] * 70, "spans": [[0, 70]]}]}
    )
    assert refused.status_code == 422 and "longer than the model's context of 64" in refused.text
