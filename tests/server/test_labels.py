"""Labels and notes: in a writable file of their own, written only with the server's token."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from saescope.server.app import create_app
from saescope.server.settings import Settings
from tests.server.test_server import assert_error

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LABEL = "/api/v1/saes/tiny-sae/features/{}/label"


@pytest.fixture()
def labels_file(tmp_path: Path) -> Path:
    return tmp_path / "labels.sqlite"


@pytest.fixture()
def client(dashboard_db: Path, labels_file: Path) -> TestClient:
    settings = Settings(database=dashboard_db, labels=labels_file, write_token=TOKEN)
    return TestClient(create_app(settings))


def test_a_label_is_written_with_the_token_and_shown_everywhere(
    client: TestClient, dashboard_db: Path, labels_file: Path
) -> None:
    before = dashboard_db.read_bytes()
    assert client.get("/api/v1/saes/tiny-sae/labels").json() == []
    body = {"label": "closing brackets", "note": "fires on ) and ]", "author": "ada"}
    written = client.put(LABEL.format(5), json=body, headers=AUTH)
    assert written.status_code == 200, written.text
    assert written.json() | body == written.json()
    listed = client.get("/api/v1/saes/tiny-sae/labels").json()
    assert [(x["feature_index"], x["label"], x["note"], x["author"]) for x in listed] == [
        (5, "closing brackets", "fires on ) and ]", "ada")
    ]
    assert "closing brackets" in client.get("/saes/tiny-sae/features/5").text
    assert "closing brackets" in client.get("/saes/tiny-sae?limit=50").text
    found = client.get("/saes/tiny-sae/search?token=brackets").text
    assert "Labels containing" in found and "/saes/tiny-sae/features/5" in found
    assert client.get("/api/v1/saes/tiny-sae/labels?q=%5D").json()[0]["feature_index"] == 5
    assert client.get("/api/v1/saes/tiny-sae/labels?q=nothing").json() == []
    # Replaced, not duplicated; then deleted.
    client.put(LABEL.format(5), json={"label": "brackets"}, headers=AUTH)
    assert [x["label"] for x in client.get("/api/v1/saes/tiny-sae/labels").json()] == ["brackets"]
    assert client.delete(LABEL.format(5), headers=AUTH).json() == {"deleted": True}
    assert client.get("/api/v1/saes/tiny-sae/labels").json() == []
    assert dashboard_db.read_bytes() == before  # the features database is never written
    assert labels_file.is_file()


def test_writes_without_the_token_are_refused(client: TestClient, dashboard_db: Path) -> None:
    body = {"label": "x"}
    assert client.put(LABEL.format(1), json=body).status_code == 401
    wrong = client.put(LABEL.format(1), json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert "write token" in wrong.json()["error"]["message"]
    assert client.delete(LABEL.format(1)).status_code == 401
    assert client.get("/api/v1/saes/tiny-sae/labels").json() == []
    read_only = TestClient(create_app(Settings(database=dashboard_db)))
    refused = read_only.put(LABEL.format(1), json=body, headers=AUTH)
    assert refused.status_code == 403
    assert "SAESCOPE_WRITE_TOKEN" in refused.json()["error"]["message"]
    assert "read-only here" in read_only.get("/saes/tiny-sae/features/1").text


def test_bad_labels_and_latents_are_refused(client: TestClient) -> None:
    assert client.put(LABEL.format(64), json={"label": "x"}, headers=AUTH).status_code == 404
    assert client.put(LABEL.format(1), json={"label": ""}, headers=AUTH).status_code == 422
    long = {"label": "x" * 201}
    assert client.put(LABEL.format(1), json=long, headers=AUTH).status_code == 422
    unknown = client.put("/api/v1/saes/nope/features/1/label", json={"label": "x"}, headers=AUTH)
    assert unknown.status_code == 404


def test_export_then_import_gives_the_same_labels(client: TestClient, dashboard_db, tmp_path):
    for index, text in [(3, "digits"), (7, "<b>markup</b>"), (60, "quotes \" and ' %_")]:
        client.put(LABEL.format(index), json={"label": text, "author": "bo"}, headers=AUTH)
    exported = client.get("/api/v1/saes/tiny-sae/labels").json()
    other = TestClient(
        create_app(
            Settings(database=dashboard_db, labels=tmp_path / "other.sqlite", write_token=TOKEN)
        )
    )
    imported = other.post("/api/v1/saes/tiny-sae/labels", json=exported, headers=AUTH)
    assert imported.status_code == 200, imported.text
    fields = ("feature_index", "label", "note", "author")
    again = other.get("/api/v1/saes/tiny-sae/labels").json()
    assert [[x[f] for f in fields] for x in again] == [[x[f] for f in fields] for x in exported]
    # Wildcards in a query are text, not patterns.
    assert [
        x["feature_index"] for x in other.get("/api/v1/saes/tiny-sae/labels?q=%25_").json()
    ] == [60]
    page = other.get("/saes/tiny-sae/features/7").text
    assert "<b>markup</b>" not in page and "&lt;b&gt;markup&lt;/b&gt;" in page


def test_only_a_bearer_token_is_accepted_and_401_says_how(client: TestClient) -> None:
    body = {"label": "x"}
    for authorization in (TOKEN, f"Basic {TOKEN}", f"Bearer{TOKEN}", "Bearer ", ""):
        refused = client.put(LABEL.format(1), json=body, headers={"Authorization": authorization})
        assert refused.status_code == 401, authorization
        assert refused.headers["www-authenticate"] == "Bearer"
    scheme_case = client.put(
        LABEL.format(1), json=body, headers={"Authorization": f"bearer {TOKEN}"}
    )
    assert scheme_case.status_code == 200


def test_an_empty_write_token_is_refused_at_start(dashboard_db: Path) -> None:
    from click.testing import CliRunner

    from saescope.cli import app

    for empty in ("", "  "):
        with pytest.raises(ValueError, match="write_token"):
            Settings(database=dashboard_db, write_token=empty)
        result = CliRunner().invoke(
            app, ["serve", str(dashboard_db)], env={"SAESCOPE_WRITE_TOKEN": empty}
        )
        assert result.exit_code == 2
        assert "error: --write-token / SAESCOPE_WRITE_TOKEN: Value error, is empty" in result.output


def test_the_token_is_checked_and_the_body_bounded_before_it_is_read(client: TestClient) -> None:
    """An unauthenticated import is refused before its body is read (a stream that would fail
    if read); an authenticated one beyond its limit is 413, declared or streamed."""

    def unread_body():
        raise AssertionError("the body was read")
        yield b""

    refused = client.post("/api/v1/saes/tiny-sae/labels", content=unread_body())
    assert refused.status_code == 401
    big = b"[" + b'{"feature_index": 1, "label": "x"},' * 300_000 + b"]"
    declared = client.post("/api/v1/saes/tiny-sae/labels", content=big, headers=AUTH)
    assert declared.status_code == 413
    assert "8,388,608 bytes" in declared.json()["error"]["message"]
    streamed = client.post(
        "/api/v1/saes/tiny-sae/labels",
        content=(big[i : i + 65536] for i in range(0, len(big), 65536)),
        headers=AUTH,
    )
    assert streamed.status_code == 413
    too_long_label = client.put(
        LABEL.format(1), json={"label": "x", "note": "n" * 70_000}, headers=AUTH
    )
    assert too_long_label.status_code == 413
    assert client.get("/api/v1/saes/tiny-sae/labels").json() == []
    activations = client.post("/api/v1/saes/tiny-sae/activations", content=b"x" * (300 << 10))
    assert activations.status_code == 413


def test_a_locked_labels_file_is_a_503_never_a_silent_empty_export(
    client: TestClient, labels_file: Path
) -> None:
    import sqlite3

    client.put(LABEL.format(2), json={"label": "kept"}, headers=AUTH)
    holder = sqlite3.connect(labels_file)
    holder.execute("begin exclusive")
    try:
        for response in (
            client.get("/api/v1/saes/tiny-sae/labels"),
            client.put(LABEL.format(3), json={"label": "x"}, headers=AUTH),
        ):
            assert_error(response, 503, "locked by another process")
            assert response.headers["retry-after"] == "2"
    finally:
        holder.rollback()
        holder.close()
    assert [x["label"] for x in client.get("/api/v1/saes/tiny-sae/labels").json()] == ["kept"]


def test_a_corrupt_or_unwritable_labels_file_is_an_error_at_start(
    dashboard_db: Path, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from saescope.cli import app

    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"this is not a database" * 100)
    result = CliRunner().invoke(app, ["serve", str(dashboard_db), "--labels", str(corrupt)])
    assert result.exit_code == 2
    assert f"error: labels file {corrupt}" in result.output
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        settings = Settings(
            database=dashboard_db, labels=read_only / "labels.sqlite", write_token=TOKEN
        )
        if os.access(read_only, os.W_OK):
            pytest.skip("running as a user who may write anywhere")
        with pytest.raises(OSError, match="not writable"):
            create_app(settings)
        # Without the token, labels are only read: the server starts.
        create_app(Settings(database=dashboard_db, labels=read_only / "labels.sqlite"))
    finally:
        read_only.chmod(0o755)
