"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn

from saescope.server.app import create_app
from saescope.server.settings import Settings
from tests.conftest import free_port

CHROMIUM = "/usr/bin/chromium"
# Without the networking flags Chromium tries to reach Google's hosts, which this machine refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """The dashboard with `settings`, in a thread, for the block; yields its URL."""
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=free_port(), log_level="error"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{config.port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def base_url(dashboard_db: Path, inference_url: str) -> Iterator[str]:
    with serving(Settings(database=dashboard_db, inference_url=inference_url)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture()
def screenshots(tmp_path: Path) -> Path:
    directory = Path(os.environ.get("SAESCOPE_SCREENSHOTS", tmp_path))
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def test_feature_page_draws_its_charts_and_tokens_link_to_search(
    browser, base_url: str, busiest_feature: int, screenshots: Path
) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{base_url}/saes/tiny-sae/features/{busiest_feature}")
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 2")
    charts = page.locator("[data-chart]")
    assert charts.count() == 2
    for index in range(charts.count()):
        chart = charts.nth(index)
        assert chart.locator(".main-svg").count() >= 1
        assert chart.locator(".bars path, .scatterlayer .trace").count() >= 1, "chart has no data"
    assert page.locator(".example").count() > 0
    page.screenshot(path=str(screenshots / "feature.png"), full_page=True)
    assert errors == []

    token = page.locator(".example a.tok").first
    token_text = token.text_content()
    token.click()
    page.wait_for_url("**/saes/tiny-sae/search?token=*")
    assert "Tokens matching" in page.locator("h1").text_content()
    assert page.locator(".match").count() >= 1
    assert token_text.strip() in page.locator(".match h2").first.text_content()
    page.screenshot(path=str(screenshots / "search.png"), full_page=True)
    assert errors == []
    page.close()


@pytest.mark.parametrize("path", ["/", "/saes/tiny-sae", "/saes/tiny-sae/flags"])
def test_other_pages_load_without_console_errors(browser, base_url, screenshots, path) -> None:
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(base_url + path)
    page.wait_for_load_state("networkidle")
    name = path.strip("/").replace("/", "_") or "index"
    page.screenshot(path=str(screenshots / f"{name}.png"), full_page=True)
    assert errors == []
    page.close()


@pytest.mark.parametrize(
    ("path", "charts", "traces"),
    [
        # Threshold ablation: the four rules against CE and against MSE.
        ("/saes/tiny-sae", '[data-chart="ablation"]', [4, 4]),
        # Each SAE's point and its threshold curve, against CE and against MSE.
        ("/compare", '[data-chart="frontier"]', [4, 4]),
        # The best cosines, and what random decoders of the same shapes give.
        ("/saes/tiny-sae/compare/other-sae", '[data-chart="cosines"]', [2]),
    ],
)
def test_comparison_charts_are_drawn(browser, base_url, screenshots, path, charts, traces) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(base_url + path)
    page.wait_for_load_state("networkidle")
    drawn = page.locator(charts)
    assert [
        drawn.nth(i).locator(".scatterlayer .trace, .barlayer .trace").count()
        for i in range(drawn.count())
    ] == traces
    name = "charts_" + path.strip("/").replace("/", "_")
    page.screenshot(path=str(screenshots / f"{name}.png"), full_page=True)
    assert errors == []
    page.close()


def test_markup_tokens_do_not_run(browser, base_url: str) -> None:
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(f"{base_url}/saes/tiny-sae/search?token=%3Cscript%3E")
    page.wait_for_load_state("networkidle")
    assert "<script>alert(1)</script>" in page.locator("main").inner_text()
    assert dialogs == []
    page.close()


def test_api_docs_render_offline(browser, base_url: str) -> None:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{base_url}/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=15_000)
    paths = page.locator(".opblock-summary-path").all_text_contents()
    assert "/api/v1/saes/{sae}/features/{feature_index}" in [p.replace("\u200b", "") for p in paths]
    assert errors == []
    page.close()


def chart_data(page, element_id: str) -> dict:
    """A drawn chart's traces and layout, as plotly holds them."""
    return page.evaluate(
        "id => { const e = document.getElementById(id); "
        "return {data: e.data || null, layout: e.layout || null, text: e.textContent}; }",
        element_id,
    )


def test_feature_plots_tell_the_truth(browser, base_url: str, dashboard_db: Path, screenshots):
    """Firings per bin of positions, no mean activation drawn where the latent never fires, both
    axes from 0 with round ticks; histogram tick labels that are values; a dead latent's page
    says it never fires, with n/a for its measures, and draws no empty chart."""
    with sqlite3.connect(dashboard_db) as connection:
        live, dead = (
            connection.execute(
                f"select feature_index from features where sae_id = 1 and count {op} 0 "
                "order by count limit 1"
            ).fetchone()[0]
            for op in (">", "=")
        )
    page = browser.new_page(viewport={"width": 420, "height": 900})
    page.goto(f"{base_url}/saes/tiny-sae/features/{live}")
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 2")
    positional = chart_data(page, "positional-chart")
    firings, mean = positional["data"][0]["y"], positional["data"][1]["y"]
    with sqlite3.connect(dashboard_db) as connection:
        (count,) = connection.execute(
            "select count from features where sae_id = 1 and feature_index = ?", (live,)
        ).fetchone()
    assert sum(firings) == count, "counts, not rates: every firing in one bin of positions"
    assert positional["data"][0]["type"] == "bar" and positional["data"][0]["width"] > 1
    assert all((f == 0) == (m is None) for f, m in zip(firings, mean, strict=True))
    layout = positional["layout"]
    assert layout["legend"]["y"] >= 1  # above the plot, clear of the axis title
    assert layout["yaxis2"]["title"]["text"] == "mean activation"
    assert layout["yaxis"]["rangemode"] == layout["yaxis2"]["rangemode"] == "tozero"
    assert layout["yaxis"]["range"][0] == layout["yaxis2"]["range"][0] == 0
    ticks = page.eval_on_selector_all(
        "#positional-chart .y2tick text", "texts => texts.map((t) => t.textContent)"
    )
    assert ticks and all(len(tick.replace(".", "").lstrip("0")) <= 2 for tick in ticks), ticks
    histogram = chart_data(page, "histogram-chart")
    labels = histogram["layout"]["xaxis"]["ticktext"]
    assert labels and all(float(label) > 0 for label in labels)
    assert sorted(map(float, labels)) == [float(label) for label in labels]
    page.screenshot(path=str(screenshots / "feature-narrow.png"), full_page=True)

    page.goto(f"{base_url}/saes/tiny-sae/features/{dead}")
    page.wait_for_load_state("networkidle")
    assert page.locator("[data-chart]").count() == 0, "no empty charts for a dead latent"
    assert "never fires on the corpus tokens" in page.locator("p.never-fires").inner_text()
    measures = page.locator("dl.measures").inner_text()
    assert measures.count("n/a") == 4 and "not measurable" in measures
    assert [f.inner_text() for f in page.locator("ul.flags .flag").all()] == ["dead"]
    assert page.locator("h2", has_text="Quantile bands").count() == 0
    page.screenshot(path=str(screenshots / "feature-dead.png"), full_page=True)
    page.close()


def test_typed_text_is_run_and_coloured_by_the_latent(
    browser, base_url: str, busiest_feature: int, screenshots: Path
) -> None:
    """On a feature page: type text, press Run, and every token is drawn, coloured where the
    latent fires, as the JSON route reports it."""
    import json
    import urllib.request

    text = "The cat sat on the mat.\n\tdef add(a, b): return a + b"
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{base_url}/saes/tiny-sae/features/{busiest_feature}")
    page.fill("form.text-test textarea", text)
    page.click("form.text-test button")
    page.wait_for_selector(".context.tested .tok")
    request = urllib.request.Request(
        f"{base_url}/api/v1/saes/tiny-sae/activations",
        data=json.dumps({"text": text, "features": [busiest_feature], "top": 0}).encode(),
        headers={"Content-Type": "application/json"},
    )
    expected = json.loads(urllib.request.urlopen(request).read())
    values = expected["features"][0]["activations"]
    drawn = page.eval_on_selector_all(
        ".context.tested .tok", "spans => spans.map(s => [s.textContent, s.className])"
    )
    assert len(drawn) == len(expected["tokens"]) and any(v > 0 for v in values)
    for (_, classes), value, special in zip(drawn, values, expected["special"], strict=True):
        assert ("h0" in classes.split()) == (value <= 0)
        assert ("special" in classes.split()) == special
    assert "↵" in "".join(shown for shown, _ in drawn)  # the line break drawn, not lost
    page.locator("form.text-test").screenshot(path=str(screenshots / "test-your-text.png"))
    assert errors == []


def test_the_test_page_lists_the_latents_that_fire_most(
    browser, base_url: str, screenshots: Path
) -> None:
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.goto(f"{base_url}/saes/tiny-sae/test")
    page.click("form.text-test button")
    page.wait_for_selector("table.tested-latents tbody tr")
    links = page.eval_on_selector_all(
        "table.tested-latents tbody a", "links => links.map(a => a.getAttribute('href'))"
    )
    assert links and all(link.startswith("/saes/tiny-sae/features/") for link in links)
    maxima = page.eval_on_selector_all(
        "table.tested-latents tbody tr td:nth-child(2)", "cells => cells.map(c => +c.textContent)"
    )
    assert maxima == sorted(maxima, reverse=True)
    page.screenshot(path=str(screenshots / "test-page.png"), full_page=True)


def test_the_feature_page_steers_its_latent(
    browser, base_url: str, busiest_feature: int, screenshots: Path
) -> None:
    """The steer box continues the prompt twice and shows both; greedy, as the route gives."""
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.goto(f"{base_url}/saes/tiny-sae/features/{busiest_feature}")
    assert page.input_value("form.steer input[name=feature_index]") == str(busiest_feature)
    page.fill("form.steer input[name=max_new_tokens]", "6")
    page.click("form.steer button")
    page.wait_for_selector(".steer-result .continuation")
    titles = page.eval_on_selector_all(
        ".steer-result .continuation b", "bs => bs.map(b => b.textContent)"
    )
    assert titles == ["without steering", f"latent #{busiest_feature} + 10 × decoder row"]
    page.locator("form.steer").screenshot(path=str(screenshots / "steer.png"))
    page.close()


def test_a_label_is_saved_with_the_token_and_refused_without(
    browser, dashboard_db: Path, tmp_path: Path, screenshots: Path
) -> None:
    settings = Settings(
        database=dashboard_db, labels=tmp_path / "labels.sqlite", write_token="let-me-write"
    )
    with serving(settings) as url:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(f"{url}/saes/tiny-sae/features/4")
        page.click(".label-box summary")
        page.fill(".label-form input[name=label]", "opening parentheses")
        page.fill(".label-form textarea[name=note]", "fires on ( in code and prose")
        page.fill(".label-form input[name=author]", "ada")
        page.fill(".label-form input[name=token]", "wrong")
        page.click(".label-form button")
        # (No wait_for_function: the pages' Content-Security-Policy forbids evaluating strings.)
        page.locator(".label-status", has_text="write token").wait_for()
        assert page.inner_text(".label-shown") == "No label yet."
        page.fill(".label-form input[name=token]", "let-me-write")
        page.click(".label-form button")
        page.locator(".label-status", has_text="saved").wait_for()
        assert "opening parentheses" in page.inner_text(".label-shown")
        page.screenshot(path=str(screenshots / "label-saved.png"))
        # Shown after a reload, in the table and in search.
        page.goto(f"{url}/saes/tiny-sae/features/4")
        assert "opening parentheses" in page.inner_text(".label-shown")
        page.goto(f"{url}/saes/tiny-sae?limit=10")
        assert "opening parentheses" in page.inner_text("table")
        page.goto(f"{url}/saes/tiny-sae/search?token=parentheses")
        assert "opening parentheses" in page.inner_text("ul.labelled")
        page.close()


def test_the_table_fits_a_narrow_screen(browser, base_url: str, screenshots: Path) -> None:
    """At 420 px the page does not scroll sideways: the table scrolls inside its box."""
    page = browser.new_page(viewport={"width": 420, "height": 900})
    page.goto(f"{base_url}/saes/tiny-sae?sort=frequency&order=desc")
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= 420
    page.screenshot(path=str(screenshots / "table-420px.png"))
    page.close()


def test_a_redirect_in_the_browser_stays_on_the_origin(
    browser, base_url: str, dashboard_db: Path
) -> None:
    """`//host:port/x/` on one dashboard, with a second one listening at that host and port: the
    trailing-slash redirect leaves the browser on the first. (Chromium itself turns `/\\host`
    into `//host`; the raw form is tested on the app in tests/server/test_reliability.py.)"""
    with serving(Settings(database=dashboard_db)) as other:
        other_host = other.removeprefix("http://")
        page = browser.new_page()
        page.goto(f"{base_url}//{other_host}/api/v1/health/")
        assert page.url.startswith(f"{base_url}/"), page.url
        page.close()
