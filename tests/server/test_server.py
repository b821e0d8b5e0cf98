"""In-process tests of every route: status codes, the JSON contract, error bodies, escaping."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from saescope.db.explanations import ExplanationStore
from saescope.db.models import SCHEMA_VERSION
from saescope.server.app import create_app
from saescope.server.settings import Settings
from tests.conftest import XSS

SAE = "tiny-sae"


@pytest.fixture(scope="module")
def client(dashboard_db: Path) -> TestClient:
    return TestClient(create_app(Settings(database=dashboard_db)))


def assert_error(response, status: int, fragment: str) -> None:
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"status", "title", "message", "details"}
    assert body["error"]["status"] == status
    assert fragment in body["error"]["message"]


def test_health(client: TestClient) -> None:
    assert client.get("/api/v1/health").json() == {
        "status": "ok",
        "schema_version": SCHEMA_VERSION,
        "saes": 2,
    }


def test_saes_carry_their_metrics(client: TestClient, dashboard_db: Path) -> None:
    sae, _ = client.get("/api/v1/saes").json()
    assert sae["name"] == SAE and sae["d_sae"] == 64 and sae["hook"] == "blocks.1.hook_resid_pre"
    (count, frequencies) = zip(
        *rows(dashboard_db, "select count, frequency from features where sae_id = 1"), strict=True
    )
    assert sae["l0"] == pytest.approx(sum(count) / sae["tokens_seen"])
    assert sae["dead_count"] == sum(c == 0 for c in count)
    assert sae["dense_count"] == sum(f > sae["high_frequency_threshold"] for f in frequencies)
    assert sae["mse"] > 0 and sae["explained_variance"] < 1
    assert sae["ce_score"] == pytest.approx(
        (sae["ce_zero"] - sae["ce_sae"]) / (sae["ce_zero"] - sae["ce_clean"])
    )
    detail = client.get(f"/api/v1/saes/{SAE}").json()
    assert detail["config"]["hook"] == "blocks.1.hook_resid_pre"


def test_feature_json_contract(client: TestClient, dashboard_db: Path, busiest_feature) -> None:
    feature = client.get(f"/api/v1/saes/{SAE}/features/{busiest_feature}").json()
    ((count, frequency, maximum, tokens_seen),) = rows(
        dashboard_db,
        "select count, frequency, max_activation, tokens_seen from features join saes "
        "on saes.id = features.sae_id where saes.name = 'tiny-sae' and feature_index = ?",
        busiest_feature,
    )
    assert (feature["count"], feature["frequency"]) == (count, frequency)
    assert frequency == pytest.approx(count / tokens_seen)
    assert feature["max_activation"] == maximum
    assert set(feature["examples"]) == {"top", "bottom", "quantiles", "decoder_top"}
    encoder_decoder = feature["encoder_decoder"]
    assert set(encoder_decoder) == {
        "jaccard",
        "jaccard_median",
        "miss_rate",
        "miss_rate_median",
        "absorption",
        "absorption_interval",
        "absorption_reason",
        "absorbed_positions",
        "decoder_auroc",
        "sample_positions",
        "absorbers",
    }
    # Absorption is a number with its interval, or null with a reason.
    if encoder_decoder["absorption"] is None:
        assert (
            encoder_decoder["absorption_reason"] and encoder_decoder["absorption_interval"] is None
        )
    else:
        low, high = encoder_decoder["absorption_interval"]
        assert low <= encoder_decoder["absorption"] <= high
    top = feature["examples"]["top"]
    assert top, "the most frequent feature has top examples"
    assert [e["activation"] for e in top] == sorted((e["activation"] for e in top), reverse=True)
    assert top[0]["activation"] == pytest.approx(feature["max_activation"], rel=1e-5)
    for example in top + feature["examples"]["bottom"] + feature["examples"]["decoder_top"]:
        assert len(example["tokens"]) == len(example["token_ids"]) == len(example["activations"])
        assert example["activations"][example["focus"]] == pytest.approx(
            example["activation"], abs=1e-4
        )
    assert len(feature["positional"]["firing_rate"]) == 32
    assert sum(feature["histogram"]["counts"]) == feature["count"]
    shares = [band["mass_share"] for band in feature["examples"]["quantiles"]]
    assert sum(shares) == pytest.approx(1.0)


def rows(db: Path, sql: str, *parameters) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute(sql, parameters).fetchall()


def all_pages(client: TestClient, url: str) -> list[dict]:
    seen, cursor = [], None
    while True:
        page = client.get(url + (f"&after={cursor}" if cursor else "")).json()
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen


def test_feature_table_sorts_filters_and_pages_by_key(client: TestClient) -> None:
    seen = all_pages(client, f"/api/v1/saes/{SAE}/features?sort=frequency&order=desc&limit=10")
    assert sorted(f["feature_index"] for f in seen) == list(range(64))
    frequencies = [f["frequency"] for f in seen]
    assert frequencies == sorted(frequencies, reverse=True)
    # Absorption: latents it cannot measure (null) come last, pages still cover every latent.
    seen = all_pages(client, f"/api/v1/saes/{SAE}/features?sort=absorption&order=desc&limit=7")
    assert sorted(f["feature_index"] for f in seen) == list(range(64))
    values = [-1.0 if f["absorption"] is None else f["absorption"] for f in seen]
    assert values == sorted(values, reverse=True)
    assert None in [f["absorption"] for f in seen] and max(values) >= 0
    by_index = {f["feature_index"]: f for f in seen}
    dead = client.get(f"/api/v1/saes/{SAE}/features?flag=dead&limit=200").json()["items"]
    assert [f["feature_index"] for f in dead] == [
        i for i, f in sorted(by_index.items()) if f["frequency"] == 0
    ]
    assert dead and all("dead" in f["flags"] for f in dead)
    band = all_pages(client, f"/api/v1/saes/{SAE}/features?min_frequency=0.01&max_frequency=0.5")
    assert [f["feature_index"] for f in band] == [
        i for i, f in sorted(by_index.items()) if 0.01 <= f["frequency"] <= 0.5
    ]
    assert 0 < len(band) < 64


def test_token_search_finds_exact_tokens_first(client: TestClient, dashboard_db: Path) -> None:
    result = client.get(f"/api/v1/saes/{SAE}/search", params={"token": "cat"}).json()
    first = result["matches"][0]
    assert first["token"].strip() == "cat" and first["exact"] is True
    assert [m["exact"] for m in result["matches"]] == sorted(
        (m["exact"] for m in result["matches"]), reverse=True
    )
    assert all("cat" in m["token"] for m in result["matches"])
    frequency = dict(
        rows(dashboard_db, "select feature_index, frequency from features where sae_id = 1")
    )
    stored = rows(
        dashboard_db,
        "select feature_index, count, specificity, activation from token_latents "
        "where sae_id = 1 and token_id = ? order by rank",
        first["token_id"],
    )
    assert stored, "the fixture has latents specific to ' cat'"
    kept = [row for row in stored if frequency[row[0]] <= result["max_frequency"]][:5]
    assert result["max_frequency"] == 0.1  # the SAE's high-frequency threshold
    assert [(x["feature_index"], x["count"]) for x in first["latents"]] == [
        (f, c) for f, c, _, _ in kept
    ]
    assert first["dense_left_out"] == sum(frequency[row[0]] > 0.1 for row in stored)
    specificity = [x["specificity"] for x in first["latents"]]
    assert specificity == sorted(specificity, reverse=True)
    for latent, (_, _, _, activation) in zip(first["latents"], kept, strict=True):
        context = latent["context"]
        assert context["token_ids"][context["focus"]] == first["token_id"]
        assert context["activations"][context["focus"]] == pytest.approx(activation, abs=1e-5)
        assert context["activation"] == pytest.approx(activation)
        assert not latent["dense"]


def test_token_search_leaves_dense_latents_out_unless_asked(
    client: TestClient, dashboard_db: Path
) -> None:
    frequency = dict(
        rows(dashboard_db, "select feature_index, frequency from features where sae_id = 1")
    )
    every = client.get(
        f"/api/v1/saes/{SAE}/search", params={"token": "e", "max_frequency": 1, "latents": 16}
    ).json()
    dense = [
        (m["token"], x["feature_index"])
        for m in every["matches"]
        for x in m["latents"]
        if x["dense"]
    ]
    assert dense and all(frequency[index] > 0.1 for _, index in dense)
    default = client.get(f"/api/v1/saes/{SAE}/search", params={"token": "e", "latents": 16}).json()
    for match, all_of_them in zip(default["matches"], every["matches"], strict=True):
        shown = [x["feature_index"] for x in match["latents"]]
        assert shown == [x["feature_index"] for x in all_of_them["latents"] if not x["dense"]]
        assert match["dense_left_out"] == sum(x["dense"] for x in all_of_them["latents"])
    page = client.get(f"/saes/{SAE}/search", params={"token": "e"}).text
    assert "left out" in page and "max_frequency=1" in page


def test_flags_report(client: TestClient, dashboard_db: Path) -> None:
    report = client.get(f"/api/v1/saes/{SAE}/flags?threshold=0.2").json()
    groups = {g["name"]: g for g in report["groups"]}
    assert list(groups) == ["high_frequency", "dead", "positional", "bos_dominated", "absorbed"]
    assert groups["high_frequency"]["rule"] == "fires on more than 20% of tokens"
    frequency = dict(
        rows(dashboard_db, "select feature_index, frequency from features where sae_id = 1")
    )
    above = sorted((i for i, f in frequency.items() if f > 0.2), key=lambda i: -frequency[i])
    assert 0 < len(above) < 64
    assert groups["high_frequency"]["features"] == above
    assert groups["high_frequency"]["count"] == len(above)
    assert groups["dead"]["features"] == sorted(i for i, f in frequency.items() if f == 0)


@pytest.mark.parametrize(
    ("url", "status", "fragment"),
    [
        ("/api/v1/saes/nope", 404, "no SAE named 'nope'"),
        ("/api/v1/saes/nope/features/1", 404, "no SAE named 'nope'"),
        (f"/api/v1/saes/{SAE}/features/64", 404, "has no feature 64"),
        ("/api/v1/nothing-here", 404, "no page at /api/v1/nothing-here"),
        (f"/api/v1/saes/{SAE}/features/x", 422, "feature_index"),
        (f"/api/v1/saes/{SAE}/features/-1", 422, "feature_index"),
        (f"/api/v1/saes/{SAE}/features?sort=colour", 422, "sort"),
        (f"/api/v1/saes/{SAE}/features?limit=100000", 422, "limit"),
        (f"/api/v1/saes/{SAE}/search", 422, "token"),
        (f"/api/v1/saes/{SAE}/flags?threshold=2", 422, "threshold"),
        (f"/api/v1/saes/{SAE}/features?min_frequency=0.5&max_frequency=0.1", 400, "greater"),
        (f"/api/v1/saes/{SAE}/features?sort=frequency&after=oops", 400, "cursor"),
        (f"/api/v1/saes/{SAE}/compare/nope", 404, "no SAE named 'nope'"),
        (f"/api/v1/saes/{SAE}/compare/{SAE}", 404, "not with itself"),
        (f"/api/v1/saes/{SAE}/compare/other-sae?threshold=1.5", 422, "threshold"),
        (f"/api/v1/saes/{SAE}/compare/other-sae?sort=colour", 422, "sort"),
        (f"/api/v1/saes/{SAE}/compare/other-sae?sort=cosine&after=1.0", 400, "cursor"),
        ("/api/v1/saes/nope/threshold-ablation", 404, "no SAE named 'nope'"),
    ],
)
def test_json_errors_share_one_body(client: TestClient, url: str, status: int, fragment: str):
    assert_error(client.get(url), status, fragment)


@pytest.mark.parametrize(
    ("url", "status"),
    [
        ("/saes/nope", 404),
        (f"/saes/{SAE}/features/64", 404),
        (f"/saes/{SAE}/features/x", 422),
        (f"/saes/{SAE}?min_frequency=0.5&max_frequency=0.1", 400),
        ("/no/such/page", 404),
    ],
)
def test_html_errors_are_pages_with_the_same_status(client, url: str, status: int) -> None:
    response = client.get(url)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/html")
    assert f"<h1>{status} " in response.text


@pytest.mark.parametrize(
    "url",
    [
        "/",
        f"/saes/{SAE}",
        f"/saes/{SAE}?sort=miss_rate&order=desc&flag=dead",
        f"/saes/{SAE}/features/0",
        f"/saes/{SAE}/search?token=the",
        f"/saes/{SAE}/flags",
        "/compare",
        f"/saes/{SAE}/compare/other-sae?threshold=0.9&sort=cosine&order=asc",
    ],
)
def test_every_page_renders_and_links_its_json_twin(client: TestClient, url: str) -> None:
    response = client.get(url)
    assert response.status_code == 200, response.text
    path, _, query = url.partition("?")
    twin = "/api/v1/saes" if path == "/" else "/api/v1" + path
    twin += f"?{query}" if query else ""
    assert f'href="{twin.replace("&", "&amp;")}"' in response.text
    assert client.get(twin).status_code == 200


def test_corpus_markup_is_escaped_everywhere(client: TestClient, dashboard_db: Path) -> None:
    with sqlite3.connect(dashboard_db) as connection:
        ids = {
            token: token_id
            for token_id, token in connection.execute("select token_id, token from vocab")
        }
    for markup in XSS:
        assert markup in ids, f"the tokenizer should hold {markup!r} as one token"
        page = client.get(f"/saes/{SAE}/search", params={"token": markup}).text
        assert markup not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page or "&#34;&gt;&lt;img" in page
    features = [client.get(f"/saes/{SAE}/features/{i}").text for i in range(64)]
    shown = [page for page in features if "&lt;script&gt;" in page]
    assert shown, "some feature page shows the markup token"
    assert not any("<script>alert(1)" in page or "<img src=x" in page for page in features)


def test_database_is_opened_read_only(client: TestClient, dashboard_db: Path) -> None:
    engine = client.app.state.database.engine()
    with engine.connect() as connection, pytest.raises(Exception, match=r"readonly|read-only"):
        connection.exec_driver_sql("delete from features")
    assert client.get("/api/v1/health").status_code == 200


def test_schema_version_is_checked_at_start(tmp_path: Path, dashboard_db: Path) -> None:
    from saescope.db.engine import SchemaMismatchError

    copy = tmp_path / "old.db"
    copy.write_bytes(dashboard_db.read_bytes())
    with sqlite3.connect(copy) as connection:
        connection.execute("update meta set value = '0' where key = 'schema_version'")
    with pytest.raises(SchemaMismatchError, match="schema version 0"):
        create_app(Settings(database=copy))
    result = subprocess.run(
        [sys.executable, "-m", "saescope.server", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "rebuild the database" in result.stderr


def test_a_database_lacking_a_table_is_refused_at_start(tmp_path: Path, dashboard_db: Path):
    """A file written before a table was added (same schema version) says to rebuild."""
    from saescope.db.engine import SchemaMismatchError

    copy = tmp_path / "older.db"
    copy.write_bytes(dashboard_db.read_bytes())
    with sqlite3.connect(copy) as connection:
        connection.execute("drop table external_latent_results")
    with pytest.raises(SchemaMismatchError, match="no external_latent_results table"):
        create_app(Settings(database=copy))


def test_openapi_lists_every_json_route(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths) == {
        "/api/v1/health",
        "/api/v1/saes",
        "/api/v1/saes/{sae}",
        "/api/v1/saes/{sae}/features",
        "/api/v1/saes/{sae}/features/{feature_index}",
        "/api/v1/saes/{sae}/search",
        "/api/v1/saes/{sae}/corpus",
        "/api/v1/saes/{sae}/flags",
        "/api/v1/compare",
        "/api/v1/saes/{sae}/compare/{other}",
        "/api/v1/saes/{sae}/consistency",
        "/api/v1/saes/{sae}/threshold-ablation",
        "/api/v1/saes/{sae}/activations",
        "/api/v1/saes/{sae}/steer",
        "/api/v1/saes/{sae}/labels",
        "/api/v1/saes/{sae}/features/{feature_index}/label",
        "/api/v1/saes/{sae}/test",
    }


def test_server_never_imports_torch(dashboard_db: Path) -> None:
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from saescope.server.app import create_app\n"
        "from saescope.server.settings import Settings\n"
        f"client = TestClient(create_app(Settings(database={str(dashboard_db)!r})))\n"
        "for url in ['/', '/saes/tiny-sae', '/saes/tiny-sae/features/1', '/api/v1/saes']:\n"
        "    assert client.get(url).status_code == 200\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=dashboard_db.parent)


def links(page: str, css_class: str) -> set[str]:
    """The hrefs of the page's links of one class, unescaped."""
    found = re.findall(rf'<a class="{css_class}" href="([^"]*)"', page)
    return {link.replace("&amp;", "&") for link in found}


def test_the_table_pages_forward_and_back_keeping_its_query(client: TestClient) -> None:
    query = "sort=frequency&order=desc&limit=7&min_frequency=0.01"
    first = client.get(f"/saes/{SAE}?{query}").text
    (following,) = links(first, "next")
    assert "limit=7" in following and "min_frequency=0.01" in following
    assert "sort=frequency" in following and not links(first, "previous")
    api = client.get(f"/api/v1/saes/{SAE}/features?{query}").json()
    assert f"{api['total']:,} features match these filters" in first
    second = client.get(following).text
    (back,) = links(second, "previous")
    (start,) = links(second, "first")
    rows_of = lambda page: re.findall(r"features/(\d+)\?table", page)  # noqa: E731
    assert rows_of(client.get(back).text) == rows_of(first) == rows_of(client.get(start).text)
    # Back from the third page is the second page.
    api = f"/api/v1/saes/{SAE}/features?{query}"
    page_two = client.get(f"{api}&after={client.get(api).json()['next_cursor']}").json()
    page_three = client.get(f"{api}&after={page_two['next_cursor']}").json()
    again = client.get(f"{api}&before={page_three['previous_cursor']}").json()
    assert [x["feature_index"] for x in again["items"]] == [
        x["feature_index"] for x in page_two["items"]
    ]
    assert again["previous_cursor"] is not None and again["next_cursor"] is not None
    both = client.get(f"/api/v1/saes/{SAE}/features?after=0:1&before=0:3")
    assert both.status_code == 400


def test_headers_sort_the_table_and_breadcrumbs_go_back_to_it(client: TestClient) -> None:
    page = client.get(f"/saes/{SAE}?sort=frequency&order=desc&flag=dead").text
    sort_links = links(page, "sort current")
    assert any("sort=frequency" in link and "order=asc" in link for link in sort_links)
    assert any("sort=jaccard" in link for link in links(page, "sort"))
    feature_link = re.search(r'href="(/saes/tiny-sae/features/\d+\?table=[^"]*)"', page)
    feature = client.get(feature_link.group(1).replace("&amp;", "&")).text
    crumb = re.search(r'<span>›</span><a href="([^"]*)">tiny-sae</a>', feature).group(1)
    assert "sort=frequency" in crumb and "flag=dead" in crumb and "order=desc" in crumb
    jumped = client.get(f"/saes/{SAE}/jump?feature=5", follow_redirects=False)
    assert jumped.status_code == 303 and jumped.headers["location"] == f"/saes/{SAE}/features/5"
    assert client.get(f"/saes/{SAE}/jump?feature=-1").status_code == 422


def test_whitespace_tokens_are_found_and_drawn_visibly(client: TestClient) -> None:
    """A space or a line break is searched as it is (not stripped to nothing), and chips and
    contexts draw it: spaces at a chip's ends as ·, line breaks as ↵, the raw string on
    hover; special tokens set apart."""
    for token in (" ", "\n"):
        result = client.get(f"/api/v1/saes/{SAE}/search", params={"token": token}).json()
        assert result["matches"], repr(token)
        assert all(token in match["token"] for match in result["matches"])
        assert result["matches"][0]["token"] == token and result["matches"][0]["exact"]
    page = client.get(f"/saes/{SAE}/search", params={"token": " "}).text
    assert ">·</a>" in page  # the space token's chip is not empty
    assert 'title="&#39; &#39; · token id' in page
    feature = client.get(f"/saes/{SAE}/features/4").text
    assert 'class="tok h' in feature and " special" in feature  # BOS drawn apart


def test_token_search_shows_more_on_request(client: TestClient) -> None:
    few = client.get(f"/api/v1/saes/{SAE}/search", params={"token": "e", "limit": 2}).json()
    more = client.get(f"/api/v1/saes/{SAE}/search", params={"token": "e", "limit": 6}).json()
    assert len(few["matches"]) == 2 and len(more["matches"]) == 6
    assert [m["token_id"] for m in more["matches"][:2]] == [m["token_id"] for m in few["matches"]]
    page = client.get(
        f"/saes/{SAE}/search", params={"token": "e", "limit": 2, "max_frequency": 1}
    ).text
    (link,) = links(page, "more-tokens")
    assert "limit=4" in link and "token=e" in link and "max_frequency=1" in link
    wide = client.get(
        f"/api/v1/saes/{SAE}/search", params={"token": "e", "latents": 10, "max_frequency": 1}
    ).json()
    assert max(len(m["latents"]) for m in wide["matches"]) > 5
    assert "latents=10" in next(iter(links(page, "more-latents")))


def test_tokens_are_drawn_truthfully() -> None:
    from saescope.server.templating import is_special, visible, visible_ends

    assert [visible_ends(t) for t in (" 3", "3", "a ", "\n", "")] == ["·3", "3", "a·", "↵", "∅"]
    assert [visible(t) for t in (" the", " ", "\n  ", "\t")] == [" the", "·", "↵··", "⇥"]
    assert is_special("<|endoftext|>") and is_special("</s>") and not is_special("<b>")


def test_token_search_reads_a_bounded_number_of_queries(client: TestClient) -> None:
    """The SAE, the vocabulary, the token counts, the matches' latents, the sequences of their
    contexts and the listed latents' summaries: one query each, however many tokens and
    latents match."""
    from sqlalchemy import event

    statements: list[str] = []
    engine = client.app.state.database.engine()

    def count(conn, cursor, statement, *args) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        result = client.get(
            f"/api/v1/saes/{SAE}/search", params={"token": "e", "max_frequency": 1}
        ).json()
    finally:
        event.remove(engine, "before_cursor_execute", count)
    latents = sum(len(match["latents"]) for match in result["matches"])
    assert len(result["matches"]) == 10 and latents >= 20
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) <= 6


def test_reference_matching_contract(client: TestClient, dashboard_db: Path) -> None:
    """The stored summary, the histogram of the live latents' best cosines, and the unmatched
    latents, paginated whole: every live latent below the threshold once, sorted as asked."""
    comparison = client.get(f"/api/v1/saes/{SAE}/compare/other-sae?threshold=0.95").json()
    best = dict(
        rows(
            dashboard_db,
            "select matches.feature_index, cosine from matches join features on "
            "features.sae_id = matches.sae_id and features.feature_index = matches.feature_index "
            "where matches.sae_id = 1 and count > 0",
        )
    )
    assert comparison["same_model_and_hook"] is True and comparison["latents"] == len(best)
    assert comparison["share_above_0_9"] == pytest.approx(np.mean([c > 0.9 for c in best.values()]))
    assert sum(comparison["histogram"]["counts"]) == len(best)
    assert comparison["histogram"]["edges"][0] == 0 and comparison["histogram"]["edges"][-1] == 1
    expected = sorted((i for i, c in best.items() if c < 0.95), key=lambda i: (best[i], i))
    query = f"/api/v1/saes/{SAE}/compare/other-sae?threshold=0.95&sort=cosine&order=asc&limit=7"
    seen, url = [], query
    while url:
        page = client.get(url).json()
        assert page["unmatched_count"] == len(expected)
        seen += [latent["feature_index"] for latent in page["unmatched"]]
        url = page["next_cursor"] and f"{query}&after={page['next_cursor']}"
    assert seen == expected and 0 < len(expected) < len(best)
    by_frequency = client.get(f"/api/v1/saes/{SAE}/compare/other-sae?threshold=0.95").json()
    frequencies = [latent["frequency"] for latent in by_frequency["unmatched"]]
    assert frequencies == sorted(frequencies, reverse=True)


def test_feature_json_names_its_closest_latents(client: TestClient, dashboard_db: Path) -> None:
    feature = client.get(f"/api/v1/saes/{SAE}/features/40").json()
    ((closest, cosine, bits, chance),) = rows(
        dashboard_db,
        "select other_feature_index, cosine, description_length_bits, chance_max_cosine "
        "from matches join features using (sae_id, feature_index) join comparisons using "
        "(sae_id, other_sae_id) where sae_id = 1 and feature_index = 40",
    )
    assert feature["matches"] == [
        {
            "sae": "other-sae",
            "feature_index": closest,
            "cosine": cosine,
            "chance_max_cosine": chance,
            "match": cosine > chance,
        }
    ]
    assert feature["description_length_bits"] == bits > 0
    page = client.get(f"/saes/{SAE}/features/40").text
    assert f'href="/saes/other-sae/features/{closest}"' in page
    assert ("match in" if cosine > chance else "no match above chance in") in page


def test_threshold_ablation_and_description_length_of_an_sae(client: TestClient) -> None:
    ablation = client.get(f"/api/v1/saes/{SAE}/threshold-ablation").json()
    assert [rule["name"] for rule in ablation["rules"]] == [
        "global", "lowest_k", "fraction_of_max", "quantile",
    ]  # fmt: skip
    for rule in ablation["rules"]:
        assert set(rule["points"][0]) == {"threshold", "l0", "mse", "explained_variance", "ce"}
    sae = client.get(f"/api/v1/saes/{SAE}").json()
    assert sae["description_length_precision"] in (1, 2, 4, 8, 16, 32, 64)
    table = client.get(
        f"/api/v1/saes/{SAE}/features?sort=description_length_bits&order=desc&limit=200"
    ).json()
    bits = [row["description_length_bits"] for row in table["items"]]
    assert bits == sorted(bits, reverse=True)
    assert sae["description_length_bits"] == pytest.approx(sum(bits))
    side_by_side = client.get("/api/v1/compare").json()
    assert [s["name"] for s in side_by_side["saes"]] == [SAE, "other-sae"]
    assert {(p["sae"], p["other"]) for p in side_by_side["pairs"]} == {
        (SAE, "other-sae"), ("other-sae", SAE),
    }  # fmt: skip


def test_the_api_shows_no_absolute_path(client: TestClient, dashboard_db: Path) -> None:
    """Local paths (model, SAE, corpus) are shown relative to the database's directory."""
    for url in ("/api/v1/saes", f"/api/v1/saes/{SAE}", "/api/v1/compare", f"/saes/{SAE}", "/"):
        text = client.get(url).text
        assert str(dashboard_db.parent.parent) not in text, url
    config = client.get(f"/api/v1/saes/{SAE}").json()["config"]
    assert (dashboard_db.parent / config["sae"]).resolve().is_dir()


def test_the_table_sorts_and_pages_by_explanation_score(dashboard_db: Path, tmp_path) -> None:
    """Scores kept in the explanations file order the table like a stored metric: best first,
    unscored latents last (by index), every latent once, forward and back, with the filters."""
    store = ExplanationStore(tmp_path / "explanations.sqlite")
    detection = {5: 0.9, 12: 0.6, 30: 0.9, 40: 0.55, 63: 0.75}
    for index, score in detection.items():
        for llm, lower in (("big", 0.0), ("small", 0.1)):  # a latent's best counts
            store.write({
                "sae": SAE, "feature_index": index, "llm": llm, "prompt_version": "1",
                "status": "scored", "explanation": f"{llm} says {index}",
                "detection": score - lower, "fuzzing": 1 - score + lower, "scores": {},
                "examples": [], "created_at": "2026-12-07T00:00:00",
            })  # fmt: skip
    client = TestClient(create_app(Settings(database=dashboard_db, explanations=store.path)))
    api = f"/api/v1/saes/{SAE}/features?sort=detection&order=desc&limit=3"
    seen = all_pages(client, api)
    assert [f["feature_index"] for f in seen] == [5, 30, 63, 12, 40] + [
        i for i in range(64) if i not in detection
    ]
    first = client.get(api).json()
    assert first["explanations"]["5"]["explanation"] == "big says 5"
    assert set(first["explanations"]) == {"5", "30", "63"}
    second = client.get(f"{api}&after={first['next_cursor']}").json()
    back = client.get(f"{api}&before={second['previous_cursor']}").json()
    assert [f["feature_index"] for f in back["items"]] == [5, 30, 63]
    # Ascending: unscored first; the fuzzing score is the best of each latent's too.
    ascending = all_pages(client, f"/api/v1/saes/{SAE}/features?sort=fuzzing&order=asc&limit=9")
    assert [f["feature_index"] for f in ascending][-5:] == [5, 30, 63, 12, 40]
    frequent = all_pages(client, f"{api}&min_frequency=0.01")
    assert [f["feature_index"] for f in frequent] == [
        f["feature_index"] for f in seen if f["frequency"] >= 0.01
    ]
    page = client.get(f"/saes/{SAE}?sort=detection&order=desc").text
    assert "big says 5" in page and "<td>0.90</td>" in page
    assert any("sort=fuzzing" in link for link in links(page, "sort"))
    # Without an explanations file, sorting by a score leaves the table in index order.
    bare = TestClient(create_app(Settings(database=dashboard_db, explanations=tmp_path / "none")))
    items = bare.get(f"/api/v1/saes/{SAE}/features?sort=detection&limit=200").json()["items"]
    assert [f["feature_index"] for f in items] == list(range(64))
