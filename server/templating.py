"""Jinja2 environment for the pages in frontend/templates; autoescaping is on for every page."""

from __future__ import annotations

from importlib.resources import files
from urllib.parse import quote

from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape

TEMPLATES_DIR = files("frontend") / "templates"
STATIC_DIR = files("frontend") / "static"

templates = Jinja2Templates(directory=str(TEMPLATES_DIR))


def visible(token: str) -> str:
    """Token text with line breaks and tabs made visible (spaces show under white-space: pre)."""
    return token.replace("\n", "↵").replace("\t", "⇥") or "∅"


def heat(activation: float, maximum: float) -> str:
    """Background colour for a token: transparent at 0, saturated orange at the maximum."""
    share = 0.0 if maximum <= 0 else max(0.0, min(1.0, activation / maximum))
    return f"rgba(255,140,0,{share * 0.85:.3f})"


def context_html(sae: str, tokens: list[str], activations: list[float], focus: int, scale: float):
    """An example's window: one link to the token search per token, coloured by activation.

    Built here rather than in a template loop: a feature page holds about two thousand tokens,
    and this is several times faster. Every token string goes through `escape`."""
    search = f"/saes/{quote(sae, safe='')}/search?token="
    spans = []
    for index, (token, activation) in enumerate(zip(tokens, activations, strict=True)):
        kind = "tok focus" if index == focus else "tok"
        text = escape(token)
        spans.append(
            f'<a class="{kind}" style="background:{heat(activation, scale)}" '
            f'title="{text} · {activation:.4g}" href="{search}{quote(token, safe="")}">'
            f"{escape(visible(token))}</a>"
        )
    return Markup("".join(spans))


templates.env.filters["visible"] = visible
templates.env.globals["context_html"] = context_html
templates.env.filters["quote"] = lambda text: quote(str(text), safe="")
templates.env.globals["heat"] = heat
