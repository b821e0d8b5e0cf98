"""Phrase search over the corpus: every occurrence, in corpus order, page after page, with the
latents that fire there (from the stored examples, or computed by the inference process), each
checked against an independent reading of the database or run of the model."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from saescope.server import inference
from saescope.server.app import create_app
from saescope.server.settings import Settings
from tests.conftest import HOOK, XSS, free_port, read_hooks

ROUTE = "/api/v1/saes/tiny-sae/corpus"
LISTED = 8  # latents listed per context


@pytest.fixture(scope="module")
def unconnected(dashboard_db: Path) -> TestClient:
    return TestClient(create_app(Settings(database=dashboard_db)))


@pytest.fixture(scope="module")
def connected(dashboard_db: Path, inference_url: str) -> TestClient:
    return TestClient(create_app(Settings(database=dashboard_db, inference_url=inference_url)))


@pytest.fixture(scope="module")
def corpus(dashboard_db: Path) -> tuple[list[np.ndarray], list[str]]:
    """The stored sequences' token ids and the vocabulary's strings, read with sqlite3."""
    with sqlite3.connect(dashboard_db) as connection:
        sequences = [
            np.frombuffer(blob, "<i4")
            for (blob,) in connection.execute(
                "select token_ids from corpus_sequences order by sequence_index"
            )
        ]
        vocab = [t for (t,) in connection.execute("select token from vocab order by token_id")]
    return sequences, vocab


def brute_force(sequences: list[np.ndarray], vocab: list[str], phrase: str) -> list[tuple]:
    """(sequence, first token, end token) of every occurrence, by a scan of the lowered text."""
    found = []
    for index, ids in enumerate(sequences):
        pieces = [vocab[t] for t in ids]
        owner = [i for i, piece in enumerate(pieces) for _ in piece]  # character → token
        text, at = "".join(pieces).lower(), 0
        while (at := text.find(phrase.lower(), at)) >= 0:
            found.append((index, owner[at], owner[at + len(phrase) - 1] + 1))
            at += len(phrase)
    return found


def all_pages(client: TestClient, phrase: str, limit: int) -> tuple[list[dict], list[dict]]:
    """Every context, page after page, and the pages' bodies."""
    contexts, bodies, after = [], [], None
    while True:
        params = {"phrase": phrase, "limit": limit} | ({"after": after} if after else {})
        response = client.get(ROUTE, params=params)
        assert response.status_code == 200, response.text
        bodies.append(response.json())
        contexts += bodies[-1]["contexts"]
        after = bodies[-1]["next_cursor"]
        if after is None:
            return contexts, bodies


@pytest.mark.parametrize("phrase", ["the mat", "THE CAT", "at on th", "(on Monday)", "fox"])
def test_every_occurrence_in_corpus_order_page_after_page(
    unconnected: TestClient, corpus, phrase: str
) -> None:
    sequences, vocab = corpus
    expected = brute_force(sequences, vocab, phrase)
    assert expected, "the dashboard corpus repeats its text: every phrase occurs"
    contexts, bodies = all_pages(unconnected, phrase, limit=3)
    assert [(c["sequence_index"], c["start"], c["end"]) for c in contexts] == expected
    assert all(len(body["contexts"]) == 3 for body in bodies[:-1])
    assert bodies[0]["sequences"] == len({index for index, _, _ in expected})
    for context in contexts:
        ids = sequences[context["sequence_index"]]
        low = context["start"] - context["focus"]
        assert context["token_ids"] == ids[low : low + len(context["token_ids"])].tolist()
        assert context["tokens"] == [vocab[t] for t in context["token_ids"]]
        span = context["tokens"][
            context["focus"] : context["focus"] + context["end"] - context["start"]
        ]
        assert phrase.lower() in "".join(span).lower()


def test_stored_latents_are_those_with_an_example_on_the_phrase(
    unconnected: TestClient, dashboard_db: Path
) -> None:
    with sqlite3.connect(dashboard_db) as connection:
        rows = connection.execute(
            "select feature_index, sequence_index, position, activation from examples "
            "where sae_id = (select id from saes where name = 'tiny-sae')"
        ).fetchall()
    examples = [
        (feature, int(s), int(p), float(a))
        for feature, *blobs in rows
        for s, p, a in zip(
            np.frombuffer(blobs[0], "<i4"),
            np.frombuffer(blobs[1], "<i4"),
            np.frombuffer(blobs[2], "<f4"),
            strict=True,
        )
    ]
    contexts, bodies = all_pages(unconnected, "the cat", limit=20)
    assert bodies[0]["latents_source"] == "stored"
    assert "saescope infer" in bodies[0]["latents_note"]
    listed = 0
    for context in contexts:
        best: dict[int, float] = {}
        for feature, s, p, a in examples:
            if s == context["sequence_index"] and context["start"] <= p < context["end"]:
                best[feature] = max(best.get(feature, 0.0), a)
        expected = sorted(best.items(), key=lambda e: (-e[1], e[0]))[:LISTED]
        got = [(latent["feature_index"], latent["activation"]) for latent in context["latents"]]
        assert [i for i, _ in got] == [i for i, _ in expected]
        assert [a for _, a in got] == pytest.approx([a for _, a in expected], rel=1e-4, abs=1e-5)
        listed += len(got)
    assert listed > 0


def test_computed_latents_are_the_models_on_the_corpus_tokens(
    connected: TestClient, corpus, tiny_model_dir: Path, dashboard_sae_dir: Path
) -> None:
    sequences, _ = corpus
    body = connected.get(ROUTE, params={"phrase": "the market", "limit": 4}).json()
    assert body["latents_source"] == "computed" and len(body["contexts"]) == 4
    for context in body["contexts"]:
        ids = sequences[context["sequence_index"]]
        sae, (x,) = read_hooks(tiny_model_dir, dashboard_sae_dir, (HOOK,), ids[None, :])
        with torch.no_grad():
            f = sae.encode(x[0])[context["start"] : context["end"]].max(dim=0).values
        values, indices = f.topk(LISTED)
        expected = [(int(i), float(v)) for v, i in zip(values, indices, strict=True) if v > 0]
        got = [(latent["feature_index"], latent["activation"]) for latent in context["latents"]]
        assert len(got) > 0
        assert [i for i, _ in got] == [i for i, _ in expected]
        assert [a for _, a in got] == pytest.approx([a for _, a in expected], rel=1e-4, abs=1e-5)


def test_without_an_answering_inference_process_the_stored_latents_say_why(
    dashboard_db: Path,
) -> None:
    gone = TestClient(
        create_app(Settings(database=dashboard_db, inference_url=f"http://127.0.0.1:{free_port()}"))
    )
    body = gone.get(ROUTE, params={"phrase": "the cat"}).json()
    assert body["latents_source"] == "stored"
    assert "does not answer" in body["latents_note"]


def test_contexts_longer_than_the_inference_process_runs_fall_back_to_stored(
    connected: TestClient, monkeypatch
) -> None:
    monkeypatch.setattr(inference, "MAX_TEXT_TOKENS", 4)
    body = connected.get(ROUTE, params={"phrase": "the market", "limit": 2}).json()
    assert body["latents_source"] == "stored"
    assert "the inference process runs at most 4" in body["latents_note"]


def test_refusals(unconnected: TestClient) -> None:
    short = unconnected.get(ROUTE, params={"phrase": "ab"})
    assert short.status_code == 422
    page = unconnected.get("/saes/tiny-sae/corpus", params={"phrase": "ab"})
    assert page.status_code == 422 and "at least 3 characters" in page.text
    nul = unconnected.get(ROUTE, params={"phrase": "00\x00"})
    assert nul.status_code == 400 and "NUL" in nul.json()["error"]["message"]
    cursor = unconnected.get(ROUTE, params={"phrase": "the cat", "after": "x:1"})
    assert cursor.status_code == 400
    assert "sequence:token" in cursor.json()["error"]["message"]
    unknown = unconnected.get("/api/v1/saes/no-such-sae/corpus", params={"phrase": "the cat"})
    assert unknown.status_code == 404
    nothing = unconnected.get(ROUTE, params={"phrase": "zebra crossing"}).json()
    assert nothing["contexts"] == [] and nothing["sequences"] == 0
    assert nothing["next_cursor"] is None


def test_the_page_lists_contexts_and_shows_markup_as_text(unconnected: TestClient) -> None:
    form = unconnected.get("/saes/tiny-sae/corpus")
    assert form.status_code == 200 and 'name="phrase"' in form.text
    page = unconnected.get("/saes/tiny-sae/corpus", params={"phrase": XSS[0], "limit": 2})
    assert page.status_code == 200
    assert XSS[0] not in page.text and "&lt;script&gt;" in page.text
    assert page.text.count('class="phrase-context"') == 2
    assert "next contexts" in page.text and "from the stored examples" in page.text
    search = unconnected.get("/saes/tiny-sae/search", params={"token": "market"}).text
    assert "/saes/tiny-sae/corpus?phrase=market" in search
