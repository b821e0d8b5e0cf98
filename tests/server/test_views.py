"""One view per page: every number a page shows in its main sections is in its JSON twin."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from saescope.server.app import create_app
from saescope.server.routes import API, ROUTES
from saescope.server.settings import Settings
from saescope.server.templating import TEMPLATES_DIR

SAE, OTHER = "tiny-sae", "other-sae"
# Where pages show data: headline figures, measures, tables, examples' values and places, and
# lists of latents (nav, forms and headings are the page's own).
DATA_SECTIONS = {
    ("p", "metrics"),
    ("dl", "measures"),
    ("table", None),
    ("span", "value"),
    ("span", "where"),
    ("ul", "members"),
    ("ul", "phrase-latents"),
    ("ul", "flags"),
}
NUMBER = re.compile(r"(?<![\w.#/-])[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?%?")


class ShownNumbers(HTMLParser):
    """The numbers in the text (not the attributes) inside the data sections of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.depth: list[bool] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in {"br", "img", "input", "meta", "link"}:
            return
        classes = (dict(attrs).get("class") or "").split()
        inside = any(tag == t and (c is None or c in classes) for t, c in DATA_SECTIONS)
        self.depth.append(inside or (bool(self.depth) and self.depth[-1]))
        if tag == "script":
            self.depth[-1] = False

    def handle_endtag(self, tag: str) -> None:
        if tag not in {"br", "img", "input", "meta", "link"} and self.depth:
            self.depth.pop()

    def handle_data(self, data: str) -> None:
        if self.depth and self.depth[-1]:
            self.text.append(data)

    def numbers(self) -> list[str]:
        # "12–34%": both ends of a range are percentages.
        text = re.sub(r"(\d)–(\d[\d.]*%)", r"\1%–\2", " ".join(self.text))
        return NUMBER.findall(text)


def template_numbers() -> set[str]:
    """Numbers written in the templates themselves ("95% interval", "above 0.9"): the pages' own
    words, not data."""
    words = " ".join(
        re.sub(r"{{.*?}}|{%.*?%}|{#.*?#}", " ", path.read_text(), flags=re.DOTALL)
        for path in Path(str(TEMPLATES_DIR)).glob("*.html")
    )
    return set(NUMBER.findall(words))


def json_texts(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return " ".join(json_texts(v) for v in value.values())
    if isinstance(value, list):
        return " ".join(json_texts(v) for v in value)
    return ""


def json_numbers(value: object) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in json_numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in json_numbers(v)]
    return []


def unexplained(html: str, data: object) -> list[str]:
    """The numbers a page shows that no number of its JSON rounds to, that no text of its JSON
    holds (a flag's reason) and that its template does not spell out."""
    parser = ShownNumbers()
    parser.feed(html)
    values = json_numbers(data)
    spelled = set(NUMBER.findall(json_texts(data))) | template_numbers()
    missing = []
    for shown in parser.numbers():
        if shown in spelled:
            continue
        text = shown.replace(",", "").rstrip("%")
        number = float(text)
        mantissa, _, exponent = text.lower().partition("e")
        decimals = len(mantissa.partition(".")[2])
        unit = 10.0 ** (int(exponent or 0) - decimals)
        scale = 100.0 if shown.endswith("%") else 1.0
        if not any(math.isclose(v * scale, number, abs_tol=unit / 2 * 1.0001) for v in values):
            missing.append(shown)
    return missing


@pytest.fixture(scope="module")
def client(dashboard_db: Path, tmp_path_factory) -> TestClient:
    labels = tmp_path_factory.mktemp("labels") / "labels.sqlite"
    app = create_app(Settings(database=dashboard_db, labels=labels, write_token="t"))
    client = TestClient(app)
    for feature in (1, 2, 9):
        client.put(
            f"{API}/saes/{SAE}/features/{feature}/label",
            json={"label": f"label {feature}", "note": "note"},
            headers={"Authorization": "Bearer t"},
        )
    return client


def test_the_checker_finds_a_number_the_json_lacks() -> None:
    page = '<p class="metrics">frequency <b>0.0123</b> · 12% · 1,234 tokens · min <b>7.5</b></p>'
    assert unexplained(page, {"frequency": 0.012345, "share": 0.12, "count": 1234}) == ["7.5"]
    assert unexplained("<nav>#7</nav><table><td>0.5</td></table>", {"x": 0.5}) == []


@pytest.mark.parametrize(
    "page",
    [
        "/",
        f"/saes/{SAE}",
        f"/saes/{SAE}?sort=frequency&order=desc&limit=20",
        *(f"/saes/{SAE}/features/{index}" for index in range(0, 64, 3)),
        "/compare",
        f"/saes/{SAE}/compare/{OTHER}?threshold=0.9",
        f"/saes/{SAE}/consistency?reference={OTHER}&threshold=0.9",
        f"/saes/{SAE}/test",
        f"/saes/{SAE}/search?token=the",
        f"/saes/{SAE}/search?token=e&latents=16",
        f"/saes/{SAE}/corpus?phrase=the",
        f"/saes/{SAE}/flags",
        f"/saes/{SAE}/flags?threshold=0.05",
    ],
)
def test_a_page_shows_only_what_its_json_twin_carries(client: TestClient, page: str) -> None:
    html = client.get(page)
    assert html.status_code == 200, html.text
    twin = re.search(r'<a class="json" href="([^"]+)">JSON</a>', html.text)
    assert twin, "every page links its JSON twin"
    data = client.get(twin.group(1).replace("&amp;", "&"))
    assert data.status_code == 200
    assert unexplained(html.text, data.json()) == []


def test_every_page_is_a_view_with_a_json_twin(client: TestClient) -> None:
    schema = json.loads(client.get("/openapi.json").text)
    for name, route in ROUTES.items():
        if route.page is not None and route.json is not None:
            assert API + route.json in schema["paths"], name
