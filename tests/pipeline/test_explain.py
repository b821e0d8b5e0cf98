"""`saescope explain`: the scoring arithmetic and prompt formats against hand-made cases, and
whole runs against an OpenAI-compatible server started here on the loopback (real HTTP, the
chat-completions protocol) that answers from the prompt: an oracle that knows which texts are
the latent's, so the scores it earns are known."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from saescope.cli import app
from saescope.pipeline import explain as method
from saescope.pipeline.explain import (
    Window,
    classification_scores,
    explainer_example,
    fuzzing_samples,
    marked,
    parse_explanation,
    parse_predictions,
)
from saescope.server.app import create_app
from saescope.server.settings import Settings

runner = CliRunner()


def test_balanced_accuracy_precision_recall_and_f1_by_hand() -> None:
    # 3 positives (2 found), 5 negatives (1 false alarm), 2 malformed answers left out.
    results = [(True, 1), (True, 1), (True, 0), (False, 1), *[(False, 0)] * 4,
               (True, None), (False, None)]  # fmt: skip
    scores = classification_scores(results)
    assert (scores["tp"], scores["fn"], scores["fp"], scores["tn"]) == (2, 1, 1, 4)
    assert scores["malformed"] == 2 and scores["positives"] == 3 and scores["negatives"] == 5
    assert scores["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert classification_scores([(True, None)])["balanced_accuracy"] is None


def test_marks_answers_and_the_fuzzing_rule() -> None:
    """delphi's formats: `<<…>>` around runs of consecutive marked tokens, the explanation after
    `[EXPLANATION]:`, a list answer; the explainer marks tokens above 0.3 × the example's max
    (strictly), fuzzing at or above it, and the wrong examples get as many marks as the right
    ones fire on, on average, rounded up."""
    assert marked(["a", " b", " c", " d"], [True, True, False, True]) == "<<a b>> c<< d>>"
    window = Window(["x", " y", " z", " w"], [0.0, 3.0, 10.0, 2.9])
    assert explainer_example(window, latent_max=20.0) == 'x y<< z>> w\nActivations: (" z", 5)'
    assert explainer_example(Window(["a", "b"], [3.0, 10.0]), 10.0).startswith("a<<b>>")
    assert parse_explanation("thinking...\n[EXPLANATION]: Commas in lists.") == "Commas in lists."
    assert parse_explanation("no marker") is None
    assert parse_predictions("Sure: [1, 0, 1]", 3) == [1, 0, 1]
    assert parse_predictions("[1, 0]", 3) is None and parse_predictions("[1, 2, 0]", 3) is None
    right = [Window(["a", "b", "c", "d"], [0.0, 3.0, 10.0, 0.0]),
             Window(["e", "f", "g", "h"], [1.0, 0.0, 0.0, 0.0])]  # fmt: skip
    wrong = [Window(["p", "q", "r", "s"], [0.0] * 4)]
    samples = fuzzing_samples(right, wrong, method.random.Random(0))
    assert [s.text for s in samples[:2]] == ["a<<bc>>d", "<<e>>fgh"]  # 3.0 >= 0.3 × 10
    assert (
        sum(ch.isalpha() for span in re.findall(r"<<(.*?)>>", samples[2].text) for ch in span) == 2
    )


class Oracle:
    """Answers chat completions as an LLM would, from the prompt. It knows each latent's texts:
    asked to explain, it names the latent whose band examples it was shown; asked to score, it
    answers 1 exactly for the texts (marks removed) among that latent's top and weakest
    examples. `fail_next` requests get a 500 (overloaded); after `refuse_after`, a 401."""

    def __init__(self, texts: dict[int, dict[str, set[str]]]) -> None:
        self.texts = texts
        self.requests: list[dict] = []
        self.fail_next = 0
        self.refuse_after: int | None = None
        self.malformed_explanations = False

    def answer(self, body: dict) -> tuple[int, dict]:
        self.requests.append(body)
        if self.refuse_after is not None and len(self.requests) > self.refuse_after:
            return 401, {"error": {"message": "invalid api key", "type": "auth"}}
        if self.fail_next:
            self.fail_next -= 1
            return 500, {"error": {"message": "overloaded"}}
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        if system == method.EXPLAINER_SYSTEM:
            shown = {plain(line.split(": ", 1)[1]) for line in user.splitlines()
                     if line.startswith("Example ")}  # fmt: skip
            (latent,) = [i for i, t in self.texts.items() if shown <= t["bands"]]
            content = "a guess" if self.malformed_explanations else (
                f"Looking at these...\n[EXPLANATION]: latent {latent}")  # fmt: skip
        else:
            latent = int(re.search(r"Latent explanation: latent (\d+)", user)[1])
            examples = user.split("Text examples:\n\n", 1)[1]
            texts = re.findall(r"^Example \d+: (.*)$", examples, re.M)
            content = json.dumps([int(plain(t) in self.texts[latent]["scored"]) for t in texts])
        return 200, {
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
        }  # fmt: skip


def plain(text: str) -> str:
    return text.replace("<<", "").replace(">>", "")


@contextmanager
def serving(oracle: Oracle) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, answer = oracle.answer(body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


LATENTS = [0, 3, 4, 9]


@pytest.fixture(scope="module")
def texts(dashboard_db: Path) -> dict[int, dict[str, set[str]]]:
    """Per latent, the texts of its quantile-band examples and of its top and weakest ones, as
    the API serves them."""
    client = TestClient(create_app(Settings(database=dashboard_db)))

    def joined(examples: list[dict]) -> set[str]:
        return {"".join(t for t, a in zip(e["tokens"], e["activations"], strict=True)
                        if a is not None) for e in examples}  # fmt: skip

    known = {}
    for index in range(64):
        examples = client.get(f"/api/v1/saes/tiny-sae/features/{index}").json()["examples"]
        bands = [e for band in examples["quantiles"] for e in band["examples"]]
        known[index] = {
            "bands": joined(bands),
            "scored": joined(examples["top"] + examples["bottom"]),
        }
    return known


def explain_cli(database: Path, url: str, store: Path, *more: str):
    return runner.invoke(app, ["explain", str(database), "tiny-sae", "--llm-url", url,
                               "--llm-model", "oracle-1", "--explanations", str(store),
                               "--quiet", *more])  # fmt: skip


def test_a_run_stores_scored_explanations_and_the_api_shows_them(
    dashboard_db: Path, tmp_path: Path, texts: dict, monkeypatch
) -> None:
    monkeypatch.setattr(method, "BACKOFF_SECONDS", 0.01)
    oracle = Oracle(texts)
    oracle.fail_next = 2  # two server errors, retried
    store = tmp_path / "explanations.sqlite"
    with serving(oracle) as url:
        result = explain_cli(dashboard_db, url, store, "--latents", "0,3-4,9", "--concurrency", "2")
    assert result.exit_code == 0, result.output
    assert "4 latents explained with oracle-1 (0 done before), " in result.output
    with sqlite3.connect(store) as connection:
        rows = connection.execute(
            "select feature_index, status, explanation, detection, fuzzing, scores "
            "from explanations order by feature_index"
        ).fetchall()
    assert [row[0] for row in rows] == LATENTS
    for _, status, explanation, detection, fuzzing, scores in rows:
        scores = json.loads(scores)
        assert status == "scored" and explanation.startswith("latent ")
        # The oracle finds every activating example; a context of this repetitive corpus
        # counted as non-activating may repeat one of them word for word (and fire there too):
        # the scores follow from the counts.
        for name, value in (("detection", detection), ("fuzzing", fuzzing)):
            counts = scores[name]
            assert counts["positives"] == 30 and counts["negatives"] > 10
            assert counts["tp"] == 30 and counts["fn"] == counts["malformed"] == 0
            assert value == pytest.approx((1 + counts["tn"] / counts["negatives"]) / 2)
            assert counts["fp"] <= counts["negatives"] // 2
    served = TestClient(create_app(Settings(database=dashboard_db, explanations=store)))
    shown = served.get("/api/v1/saes/tiny-sae/features/3").json()["explanations"]
    assert [(e["llm"], e["explanation"]) for e in shown] == [("oracle-1", "latent 3")]
    assert {"explanation", "llm", "detection", "fuzzing", "created_at"} <= set(shown[0])
    assert f"detection {shown[0]['detection']:.2f}" in served.get("/saes/tiny-sae/features/3").text
    found = served.get("/api/v1/saes/tiny-sae/search?token=latent 3").json()["explained"]
    assert [(e["feature_index"], e["explanation"]) for e in found] == [(3, "latent 3")]
    assert "Explanations containing" in served.get("/saes/tiny-sae/search?token=latent 3").text
    # Four explainer prompts, two of them sent twice (the 500s came first); each with marks.
    explainer = [
        r for r in oracle.requests if r["messages"][0]["content"] == method.EXPLAINER_SYSTEM
    ]
    assert len(explainer) == 4 + 2 and all("<<" in r["messages"][-1]["content"] for r in explainer)


def test_an_interrupted_run_continues_where_it_stopped(
    dashboard_db: Path, tmp_path: Path, texts: dict, monkeypatch
) -> None:
    """A key revoked mid-run ends it with the reason and keeps what is done; the next run does
    the rest, none twice. Malformed explanations are recorded as such."""
    monkeypatch.setattr(method, "BACKOFF_SECONDS", 0.01)
    store = tmp_path / "explanations.sqlite"
    oracle = Oracle(texts)
    per_latent = None
    with serving(oracle) as url:
        first = explain_cli(dashboard_db, url, store, "--latents", "0", "--concurrency", "1")
        per_latent = len(oracle.requests)
        oracle.refuse_after = len(oracle.requests) + per_latent + 3  # dies inside the 3rd latent
        stopped = explain_cli(dashboard_db, url, store, "--latents", "0-4", "--concurrency", "1")
    assert first.exit_code == 0
    assert stopped.exit_code == 2 and "refuses the request (401" in stopped.output
    with sqlite3.connect(store) as connection:
        done = [i for (i,) in connection.execute("select feature_index from explanations")]
    assert sorted(done) == [0, 1]
    fresh = Oracle(texts)
    fresh.malformed_explanations = True
    with serving(fresh) as url:
        resumed = explain_cli(dashboard_db, url, store, "--latents", "0-4")
    assert (
        resumed.exit_code == 0
        and "3 latents explained with oracle-1 (2 done before)" in resumed.output
    )
    explained = [
        r for r in fresh.requests if r["messages"][0]["content"] == method.EXPLAINER_SYSTEM
    ]
    assert len(explained) == 3  # 2, 3 and 4 only
    with sqlite3.connect(store) as connection:
        statuses = dict(connection.execute("select feature_index, status from explanations"))
    assert statuses[0] == "scored" and statuses[2].startswith("malformed")


def test_refusals_end_with_a_reason(dashboard_db: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(method, "BACKOFF_SECONDS", 0.01)
    store = tmp_path / "explanations.sqlite"
    unreachable = explain_cli(dashboard_db, "http://127.0.0.1:9/v1", store, "--latents", "0")
    assert unreachable.exit_code == 2 and "does not answer" in unreachable.output
    neither = explain_cli(dashboard_db, "http://127.0.0.1:9/v1", store)
    assert neither.exit_code == 2 and "--latents" in neither.output
    beyond = explain_cli(dashboard_db, "http://127.0.0.1:9/v1", store, "--latents", "70")
    assert beyond.exit_code == 2 and "latents 0 to 63" in beyond.output
    garbled = explain_cli(dashboard_db, "http://127.0.0.1:9/v1", store, "--latents", "a-b")
    assert garbled.exit_code == 2 and "0-999" in garbled.output
