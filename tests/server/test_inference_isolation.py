"""A hung, slow or broken inference process never takes the dashboard down: its calls time out,
only a few are in flight at once, any broken answer is a 503, corpus search falls back to the
stored latents; and the inference process bounds its own work and takes a token."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from saescope.server import inference
from saescope.server.app import create_app
from saescope.server.settings import Settings
from tests.server.test_server import assert_error

ROUTE = "/api/v1/saes/tiny-sae/activations"


@contextmanager
def fake_inference(reply: bytes | None) -> Iterator[str]:
    """A process that accepts every connection, reads the request, and answers `reply` raw
    (then closes), or never answers (None)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(connection)
            read_request(connection)
            if reply is not None:
                connection.sendall(reply)
                connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()


def read_request(connection: socket.socket) -> None:
    """The whole request, body included: closing on unread bytes would reset the connection,
    which the dashboard rightly takes for an unreachable process, not a broken answer."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
         if line.startswith(b"content-length:")),
        0,
    )  # fmt: skip
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            return
        body += chunk


BROKEN_REPLIES = {
    "not JSON": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "truncated": b'HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{"tokens": [',
    "bad status line": b"NOT HTTP AT ALL\r\n\r\n",
    "wrong shape": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
}


@pytest.mark.parametrize("kind", BROKEN_REPLIES)
def test_a_broken_answer_is_a_503_and_corpus_search_falls_back(
    dashboard_db: Path, kind: str
) -> None:
    with fake_inference(BROKEN_REPLIES[kind]) as url:
        client = TestClient(create_app(Settings(database=dashboard_db, inference_url=url)))
        assert_error(client.post(ROUTE, json={"text": "the cat"}), 503, "broken answer")
        found = client.get("/api/v1/saes/tiny-sae/corpus?phrase=the").json()
        assert found["latents_source"] == "stored"
        assert "broken answer" in found["latents_note"]


def test_a_hung_inference_process_holds_no_more_than_its_share(
    dashboard_db: Path, monkeypatch
) -> None:
    """With the process accepting and never answering, calls time out; beyond MAX_IN_FLIGHT
    they are refused at once, and health answers as usual meanwhile."""
    monkeypatch.setattr(inference, "TIMEOUT_SECONDS", 3)
    with fake_inference(None) as url:
        client = TestClient(create_app(Settings(database=dashboard_db, inference_url=url)))
        with ThreadPoolExecutor(6) as pool:
            calls = [pool.submit(client.post, ROUTE, json={"text": "the cat"}) for _ in range(6)]
            time.sleep(0.5)
            started = time.perf_counter()
            health = [client.get("/api/v1/health") for _ in range(10)]
            health_seconds = (time.perf_counter() - started) / 10
            answers = [call.result() for call in calls]
    assert all(response.status_code == 200 for response in health)
    assert health_seconds < 1.0, "health waited on the hung process"
    messages = [response.json()["error"]["message"] for response in answers]
    assert all(response.status_code == 503 for response in answers)
    assert sum("busy" in message for message in messages) == 6 - inference.MAX_IN_FLIGHT
    assert sum("does not answer" in message for message in messages) == inference.MAX_IN_FLIGHT


def test_the_inference_process_bounds_its_work_and_checks_its_token(
    dashboard_db: Path, monkeypatch
) -> None:
    from saescope.pipeline import inference as process

    entered, release = threading.Semaphore(0), threading.Event()

    def slow(self, name, request):
        entered.release()
        release.wait(10)
        raise KeyError(name)

    monkeypatch.setattr(process.Inference, "run", slow)
    app = TestClient(process.inference_app(dashboard_db, "cpu", token="t0ken"))
    auth = {"Authorization": "Bearer t0ken"}
    assert app.post("/saes/tiny-sae/activations", json={"text": "a"}).status_code == 401
    wrong = app.post(
        "/saes/tiny-sae/activations", json={"text": "a"}, headers={"Authorization": "t0ken"}
    )
    assert wrong.status_code == 401 and wrong.headers["content-type"] == "application/json"
    with ThreadPoolExecutor(process.MAX_CONCURRENT_RUNS) as pool:
        running = [
            pool.submit(app.post, "/saes/tiny-sae/activations", json={"text": "a"}, headers=auth)
            for _ in range(process.MAX_CONCURRENT_RUNS)
        ]
        for _ in running:
            assert entered.acquire(timeout=10)
        busy = app.post("/saes/tiny-sae/activations", json={"text": "a"}, headers=auth)
        release.set()
        assert [call.result().status_code for call in running] == [404] * len(running)
    assert busy.status_code == 503 and "busy" in busy.json()["detail"]


def test_the_dashboard_sends_the_inference_token(dashboard_db: Path) -> None:
    seen: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))

    def answer_once() -> None:
        connection, _ = listener.accept()
        seen.append(connection.recv(65536))
        connection.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}")
        connection.close()

    thread = threading.Thread(target=answer_once, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    settings = Settings(database=dashboard_db, inference_url=url, inference_token="t0ken")
    TestClient(create_app(settings)).post(ROUTE, json={"text": "the cat"})
    thread.join(5)
    listener.close()
    assert b"Authorization: Bearer t0ken" in seen[0]
