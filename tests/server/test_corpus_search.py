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


def all_pages(
    client: TestClient, phrase: str, limit: int, **params: object
) -> tuple[list[dict], list[dict]]:
    """Every context, page after page, and the pages' bodies (every latent listed, dense ones
    too, unless `params` say otherwise)."""
    contexts, bodies, after = [], [], None
    while True:
        params = {"max_frequency": 1} | params | {"phrase": phrase, "limit": limit}
        params = params | ({"after": after} if after else {})
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


def stored_examples(dashboard_db: Path) -> list[tuple[int, int, int, float]]:
    """(latent, sequence, position, activation) of every stored example, read with sqlite3."""
    with sqlite3.connect(dashboard_db) as connection:
        rows = connection.execute(
            "select feature_index, sequence_index, position, activation from examples "
            "where sae_id = (select id from saes where name = 'tiny-sae')"
        ).fetchall()
    return [
        (feature, int(s), int(p), float(a))
        for feature, *blobs in rows
        for s, p, a in zip(
            np.frombuffer(blobs[0], "<i4"),
            np.frombuffer(blobs[1], "<i4"),
            np.frombuffer(blobs[2], "<f4"),
            strict=True,
        )
    ]


def firing(dashboard_db: Path) -> dict[int, tuple[float, float]]:
    """Each latent's frequency and mean activation where it fires."""
    with sqlite3.connect(dashboard_db) as connection:
        rows = connection.execute(
            "select feature_index, frequency, mean_activation from features "
            "where sae_id = (select id from saes where name = 'tiny-sae')"
        )
        return {index: (frequency, mean) for index, frequency, mean in rows}


def stored_on(examples: list, context: dict) -> dict[int, float]:
    """The latents with an example on the context's phrase where they fire, each with its
    highest activation there."""
    best: dict[int, float] = {}
    for feature, s, p, a in examples:
        if s == context["sequence_index"] and context["start"] <= p < context["end"] and a > 0:
            best[feature] = max(best.get(feature, 0.0), a)
    return best


@pytest.mark.parametrize("max_frequency", [1.0, None])
def test_stored_latents_are_those_with_an_example_on_the_phrase(
    unconnected: TestClient, dashboard_db: Path, max_frequency: float | None
) -> None:
    """Every latent with an example on the phrase, strongest first; by default those firing on
    more than the SAE's high-frequency threshold left out."""
    examples, frequency = stored_examples(dashboard_db), firing(dashboard_db)
    params = {"max_frequency": "" if max_frequency is None else max_frequency}
    contexts, bodies = all_pages(unconnected, "the cat", limit=20, **params)
    assert bodies[0]["latents_source"] == "stored"
    assert "saescope infer" in bodies[0]["latents_note"]
    assert bodies[0]["max_frequency"] == (max_frequency or 0.1)
    listed = left_out = 0
    for context in contexts:
        best = stored_on(examples, context)
        kept = {j: a for j, a in best.items() if frequency[j][0] <= (max_frequency or 0.1)}
        left_out += len(best) - len(kept)
        expected = sorted(kept.items(), key=lambda e: (-e[1], e[0]))[:LISTED]
        got = [(latent["feature_index"], latent["activation"]) for latent in context["latents"]]
        assert [i for i, _ in got] == [i for i, _ in expected]
        assert [a for _, a in got] == pytest.approx([a for _, a in expected], rel=1e-4, abs=1e-5)
        listed += len(got)
    assert listed > 0
    assert (left_out > 0) == (max_frequency is None), "the fixture has dense latents on it"


def test_the_summary_ranks_latents_by_specificity_to_the_phrase(
    unconnected: TestClient, dashboard_db: Path
) -> None:
    """Over the phrase's first contexts (all of them here): per latent, the contexts it fires
    on and the mean of its highest activation per context (zeros included) over its mean per
    corpus token; brute force from the stored examples."""
    from saescope.db.queries.phrase_search import SUMMARY_CONTEXTS

    examples, frequency = stored_examples(dashboard_db), firing(dashboard_db)
    contexts, bodies = all_pages(unconnected, "the cat", limit=20)
    assert len(contexts) <= SUMMARY_CONTEXTS
    assert bodies[0]["summary_contexts"] == len(contexts)
    per_context = [stored_on(examples, context) for context in contexts]
    fires_on: dict[int, int] = {}
    total: dict[int, float] = {}
    for best in per_context:
        for latent, value in best.items():
            fires_on[latent] = fires_on.get(latent, 0) + 1
            total[latent] = total.get(latent, 0.0) + value
    specificity = {
        j: total[j] / len(contexts) / (frequency[j][0] * frequency[j][1])
        for j, count in fires_on.items()
        if count >= 3
    }
    expected = sorted(specificity, key=lambda j: (-specificity[j], j))[:25]
    summary = bodies[0]["summary"]
    assert [latent["feature_index"] for latent in summary] == expected
    for latent in summary:
        j = latent["feature_index"]
        assert latent["fires_on"] == fires_on[j]
        assert latent["specificity"] == pytest.approx(specificity[j], rel=1e-4)
    assert all(body["summary"] == summary for body in bodies)


def test_previous_pages_walk_back_the_same_contexts(unconnected: TestClient) -> None:
    forward, bodies = all_pages(unconnected, "the", limit=7)
    assert len(bodies) >= 3 and bodies[0]["previous_cursor"] is None
    backward, before = [], bodies[-1]["previous_cursor"]
    while before is not None:
        page = unconnected.get(
            ROUTE, params={"phrase": "the", "limit": 7, "before": before, "max_frequency": 1}
        ).json()
        assert page["next_cursor"] is not None
        backward = page["contexts"] + backward
        before = page["previous_cursor"]
    assert backward + bodies[-1]["contexts"] == forward
    both = unconnected.get(ROUTE, params={"phrase": "the", "after": "0:1", "before": "3:1"})
    assert both.status_code == 400
    html = unconnected.get("/saes/tiny-sae/corpus", params={"phrase": "the", "after": "2:0"})
    assert "previous contexts" in html.text and "next contexts" in html.text


def test_computed_latents_are_the_models_on_the_corpus_tokens(
    connected: TestClient, corpus, tiny_model_dir: Path, dashboard_sae_dir: Path
) -> None:
    sequences, _ = corpus
    body = connected.get(
        ROUTE, params={"phrase": "the market", "limit": 4, "max_frequency": 1}
    ).json()
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


def test_a_refusal_of_the_inference_process_falls_back_to_stored(
    connected: TestClient, monkeypatch
) -> None:
    """The inference process answers 404 for an SAE it does not have: the stored latents, and
    why."""
    monkeypatch.setattr(inference, "quote", lambda name, safe: "no-such-sae")
    body = connected.get(ROUTE, params={"phrase": "the market", "limit": 2}).json()
    assert body["latents_source"] == "stored"
    assert "refused the corpus's tokens: no SAE named 'no-such-sae'" in body["latents_note"]


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
