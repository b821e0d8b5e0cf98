"""The server under hostile or unlucky input: a database replaced or deleted under it, numbers
out of every range, empty form fields, and the HTTP details of every response."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from saescope.db.engine import SETTLE_SECONDS
from saescope.server.app import create_app
from saescope.server.middleware import MAX_URL_LENGTH
from saescope.server.settings import Settings

SAE = "tiny-sae"


@pytest.fixture(scope="module")
def client(dashboard_db: Path) -> TestClient:
    return TestClient(create_app(Settings(database=dashboard_db)), follow_redirects=False)


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["status"] == response.status_code
    return body["error"]


def test_a_replaced_database_is_served_whole_and_a_deleted_one_is_reported(
    tmp_path: Path, dashboard_db: Path
) -> None:
    served = tmp_path / "served.db"
    shutil.copy(dashboard_db, served)
    client = TestClient(create_app(Settings(database=served)))
    assert client.get("/api/v1/health").json()["saes"] == 2
    before = client.get(f"/api/v1/saes/{SAE}/features/3").json()

    # A rebuild: another file, with the SAE renamed and another token string, renamed into place.
    rebuilt = tmp_path / ".served.db.1.tmp"
    shutil.copy(dashboard_db, rebuilt)
    with sqlite3.connect(rebuilt) as connection:
        connection.execute("update saes set name = 'rebuilt' where name = ?", (SAE,))
        connection.execute("update vocab set token = 'REPLACED' where token_id = ?", (
            before["top_tokens"][0]["token_id"],
        ))  # fmt: skip
    rebuilt.replace(served)
    for _ in range(20):  # whichever pooled connection answers
        assert client.get(f"/api/v1/saes/{SAE}").status_code == 404
        feature = client.get("/api/v1/saes/rebuilt/features/3").json()
        assert feature["top_tokens"][0]["token"] == "REPLACED"

    served.unlink()
    health = client.get("/api/v1/health")
    assert health.status_code == 503
    assert "no database at" in error_of(health)["message"]
    page = client.get("/saes/rebuilt")
    assert page.status_code == 503 and page.headers["content-type"].startswith("text/html")
    shutil.copy(dashboard_db, served)
    assert client.get("/api/v1/health").status_code == 200

    with sqlite3.connect(served) as connection:  # another schema: reported, not served
        connection.execute("update meta set value = '1' where key = 'schema_version'")
    assert "overwritten in place" in error_of(client.get("/api/v1/saes"))["message"]
    time.sleep(SETTLE_SECONDS)
    assert "schema version 1" in error_of(client.get("/api/v1/saes"))["message"]


def test_a_database_overwritten_in_place_is_503_until_it_is_whole(
    tmp_path: Path, dashboard_db: Path
) -> None:
    served = tmp_path / "served.db"
    shutil.copy(dashboard_db, served)
    client = TestClient(create_app(Settings(database=served)))
    assert client.get(f"/api/v1/saes/{SAE}/features/3").status_code == 200
    whole = dashboard_db.read_bytes()
    with served.open("r+b") as file:  # a copy over the file, half done: same inode
        file.seek(0)
        file.write(b"\0" * 4096)
        file.truncate(len(whole) // 2)
    for url in ("/api/v1/health", f"/api/v1/saes/{SAE}/features/3", f"/saes/{SAE}"):
        response = client.get(url)
        assert response.status_code == 503, url
    assert "overwritten in place" in error_of(client.get("/api/v1/health"))["message"]
    with served.open("r+b") as file:
        file.write(whole)
    assert client.get("/api/v1/health").status_code == 503, "not yet settled"
    time.sleep(SETTLE_SECONDS)
    assert client.get(f"/api/v1/saes/{SAE}/features/3").status_code == 200


@pytest.mark.parametrize(
    ("url", "status"),
    [
        (f"/api/v1/saes/{SAE}/features/1972994663910723507191808", 404),
        (f"/api/v1/saes/{SAE}/features/9223372036854775808", 404),
        (f"/saes/{SAE}/features/9223372036854775808", 404),
        (f"/api/v1/saes/{SAE}/features?after=1:{10**30}", 400),
        (f"/api/v1/saes/{SAE}/features?after={10**30}:1", 400),
        (f"/api/v1/saes/{SAE}/features?sort=frequency&after=0.1:9223372036854775808", 400),
        (f"/saes/{SAE}?sort=frequency&after=0.1:9223372036854775808", 400),
        (f"/api/v1/saes/{SAE}/features?sort=frequency&after=nan:5", 400),
        (f"/api/v1/saes/{SAE}/features?sort=frequency&after=1e999:3", 400),
        (f"/api/v1/saes/{SAE}/features?min_frequency=nan", 422),
        (f"/api/v1/saes/{SAE}/features?limit={10**30}", 422),
        (f"/api/v1/saes/{SAE}/flags?threshold=inf", 422),
    ],
)
def test_numbers_out_of_range_are_client_errors(client: TestClient, url: str, status: int):
    response = client.get(url)
    assert response.status_code == status, response.text


def test_empty_form_fields_mean_no_filter(client: TestClient) -> None:
    everything = client.get(f"/api/v1/saes/{SAE}/features?limit=200").json()["items"]
    empty = client.get(f"/api/v1/saes/{SAE}/features?flag=&min_frequency=&max_frequency=&limit=200")
    assert empty.status_code == 200
    assert empty.json()["items"] == everything
    page = client.get(
        f"/saes/{SAE}?sort=feature_index&order=asc&flag=&min_frequency=&max_frequency="
    )
    assert page.status_code == 200


def test_a_long_sae_name_is_not_echoed(client: TestClient) -> None:
    response = client.get("/api/v1/saes/" + "x" * 5000)
    assert response.status_code == 422
    assert len(response.text) < 1000
    response = client.get("/no-such-page/" + "y" * 5000)
    assert response.status_code == 404 and len(response.text) < 5000


def test_an_over_long_url_is_refused(client: TestClient) -> None:
    response = client.get(f"/api/v1/saes/{SAE}/search?token=" + "z" * MAX_URL_LENGTH)
    assert response.status_code == 414
    assert "longer than" in error_of(response)["message"]


def test_head_answers_as_get_without_a_body(client: TestClient) -> None:
    for url in ("/", f"/saes/{SAE}", f"/api/v1/saes/{SAE}/features/3", "/api/v1/health"):
        got, head = client.get(url), client.head(url)
        assert head.status_code == got.status_code == 200
        assert head.content == b""
        assert head.headers["content-type"] == got.headers["content-type"]


def test_a_trailing_slash_redirects_to_a_relative_path(client: TestClient) -> None:
    response = client.get(f"/saes/{SAE}/?sort=frequency", headers={"Host": "evil.example"})
    assert response.status_code == 307
    assert response.headers["location"] == f"/saes/{SAE}?sort=frequency"


@pytest.mark.parametrize("raw", [b"//evil.example/", b"/\\evil.example/", b"///\\/evil.example//"])
def test_no_redirect_leaves_the_origin(client: TestClient, raw: bytes) -> None:
    """`//host` and `/\\host` are read by browsers as another origin: a redirect keeps one
    leading slash, a path on this server."""
    import asyncio

    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": "GET", "path": raw.decode(), "raw_path": raw,
        "query_string": b"", "headers": [], "http_version": "1.1", "scheme": "http",
        "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": "",
    }  # fmt: skip
    asyncio.run(client.app(scope, receive, send))  # raw: test clients clean such paths
    start = sent[0]
    assert start["status"] == 307
    assert dict(start["headers"])[b"location"] == b"/evil.example"


def test_every_response_carries_the_security_headers(client: TestClient) -> None:
    for url in ("/", f"/saes/{SAE}/features/3", "/api/v1/saes", "/docs", "/nope"):
        headers = client.get(url).headers
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        policy = headers["content-security-policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy


def test_pages_have_no_inline_script(client: TestClient, busiest_feature: int) -> None:
    """The policy allows only the server's own script files: every <script> on a page either
    loads one or holds data (application/json), which browsers do not run."""
    import re

    for url in ("/", f"/saes/{SAE}", f"/saes/{SAE}/features/{busiest_feature}", "/docs"):
        for tag, body in re.findall(r"<script([^>]*)>(.*?)</script>", client.get(url).text, re.S):
            assert "src=" in tag or 'type="application/json"' in tag, (url, tag)
            assert "src=" not in tag or not body.strip()


def test_responses_are_compressed_and_static_files_cached(client: TestClient) -> None:
    page = client.get(f"/saes/{SAE}/features/3", headers={"Accept-Encoding": "gzip"})
    assert page.headers["content-encoding"] == "gzip"
    raw = client.get("/static/plotly-basic.min.js", headers={"Accept-Encoding": "gzip"})
    assert raw.headers["content-encoding"] == "gzip"
    assert "immutable" not in raw.headers.get("cache-control", "")
    html = client.get(f"/saes/{SAE}/features/3").text
    (plotly,) = [
        part for part in html.split('"') if part.startswith("/static/plotly-basic.min.js?v=")
    ]
    versioned = client.get(plotly, headers={"Accept-Encoding": "gzip"})
    assert versioned.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert versioned.num_bytes_downloaded < len(versioned.content) / 2  # sent compressed


def test_other_host_headers_are_refused(dashboard_db: Path) -> None:
    settings = Settings(database=dashboard_db, allowed_hosts="localhost, 127.0.0.1,[::1]")
    guarded = TestClient(create_app(settings), base_url="http://127.0.0.1:8000")
    assert guarded.get("/api/v1/health").status_code == 200
    assert guarded.get("/api/v1/health", headers={"Host": "LOCALHOST:9"}).status_code == 200
    assert guarded.get("/api/v1/health", headers={"Host": "[::1]:8000"}).status_code == 200
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""):
        refused = guarded.get("/api/v1/health", headers={"Host": host})
        assert refused.status_code == 400, host
        assert "does not answer to the host" in error_of(refused)["message"]
    anyone = Settings(database=dashboard_db, allowed_hosts="*")
    assert TestClient(create_app(anyone)).get("/api/v1/health").status_code == 200


def test_405_says_which_methods_are_allowed(client: TestClient) -> None:
    response = client.delete("/api/v1/health")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
