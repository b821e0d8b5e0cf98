"""Jinja2 environment for the pages in frontend/templates; autoescaping is on for every page."""

from __future__ import annotations

import re
from functools import lru_cache
from importlib.resources import files
from typing import Any
from urllib.parse import quote

from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape
from pydantic_core import to_jsonable_python

from saescope.db import metrics
from saescope.db.explanations import SCORES
from saescope.db.flags import FLAGS, FLAGS_BY_NAME
from saescope.db.queries.comparisons import UnmatchedSort
from saescope.db.queries.consistency import ConsistencySort
from saescope.db.queries.feature_table import SortKey
from saescope.db.queries.paging import SortOrder
from saescope.server import urls

TEMPLATES_DIR = files("saescope.frontend") / "templates"

templates = Jinja2Templates(directory=str(TEMPLATES_DIR))


# Special tokens (BOS/EOS/pad) as tokenizers spell them, drawn apart from text.
SPECIAL_TOKEN = re.compile(r"<\|[^|<>]*\|>|</?s>|<(pad|bos|eos|unk)>")


def visible(token: str) -> str:
    """Token text as running text draws it: line breaks and tabs made visible, and the spaces
    of a token that is nothing but spaces."""
    shown = token.replace("\n", "↵").replace("\t", "⇥")
    return shown.replace(" ", "·") if token.isspace() else shown or "∅"


def visible_ends(token: str) -> str:
    """Token text as a chip draws it, alone: spaces at its ends made visible too, so that " 3"
    and "3" differ."""
    shown = visible(token)
    stripped = shown.strip(" ")
    if not stripped:
        return shown
    start = shown.index(stripped)
    return "·" * start + stripped + "·" * (len(shown) - start - len(stripped))


def is_special(token: str) -> bool:
    return SPECIAL_TOKEN.fullmatch(token) is not None


HEAT_LEVELS = 10


def heat(activation: float, maximum: float) -> int:
    """Colour level 0..HEAT_LEVELS of a token: its activation as a share of the maximum."""
    if maximum <= 0 or activation <= 0:
        return 0
    return max(1, min(HEAT_LEVELS, round(HEAT_LEVELS * activation / maximum)))


def context_html(
    sae: str,
    tokens: list[str],
    activations: list[float | None] | None,
    focus: int,
    scale: float,
    focus_length: int = 1,
):
    """A window of tokens: one link to the token search per token, coloured by activation
    (classes h0..h10 in style.css; none where unknown), the value in the title, and the
    `focus_length` tokens from `focus` highlighted.

    Built here rather than in a template loop: a feature page holds about two thousand tokens,
    and this is several times faster. Every token string goes through `escape`."""
    search = urls.token_search_prefix(sae)
    spans = []
    for index, token in enumerate(tokens):
        focus_class = " focus" if focus <= index < focus + focus_length else ""
        text, quoted, shown, special = _token_parts(token)
        if activations is None or activations[index] is None:
            level, title = 0, text
        else:
            level, title = heat(activations[index], scale), f"{text} · {activations[index]:.4g}"
        spans.append(
            f'<a class="tok h{level}{focus_class}{special}" title="{title}" '
            f'href="{search}{quoted}">{shown}</a>'
        )
    return Markup("".join(spans))


@lru_cache(maxsize=1 << 16)
def _token_parts(token: str) -> tuple[str, str, str, str]:
    """A token as its title shows it (the raw string, quoted), quoted for a URL, escaped as
    shown, and its class if special: tokens repeat across a page's examples, and across
    pages."""
    return (
        str(escape(repr(token))),
        quote(token, safe=""),
        str(escape(visible(token))),
        " special" if is_special(token) else "",
    )


def metric_cells(row: Any) -> Markup:
    """A feature-table row's cells of the table metrics (`db.metrics`): built here rather than
    in a template loop, several times faster over a page of rows."""
    return Markup(
        "".join(
            f"<td>{escape(metric.cell(getattr(row, metric.name)))}</td>"
            for metric in metrics.TABLE_COLUMNS
        )
    )


templates.env.filters["visible"] = visible
# Response models (and lists of them) as plain JSON values, for `tojson`.
templates.env.filters["plain"] = to_jsonable_python
templates.env.filters["visible_ends"] = visible_ends
templates.env.tests["special_token"] = is_special
templates.env.filters["sentence"] = lambda text: text[:1].upper() + text[1:]
templates.env.filters["flag_label"] = lambda name: FLAGS_BY_NAME[name].label
templates.env.globals.update(
    context_html=context_html,
    metric_cells=metric_cells,
    urls=urls,
    FLAGS=FLAGS,
    metrics=metrics,
    SORT_KEYS=list(SortKey),
    EXPLANATION_SCORES=SCORES,
    SORT_ORDERS=list(SortOrder),
    UNMATCHED_SORT_KEYS=list(UnmatchedSort),
    CONSISTENCY_SORT_KEYS=list(ConsistencySort),
)
