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
