"""Jinja2 environment for the pages in frontend/templates; autoescaping is on for every page."""

from __future__ import annotations

from importlib.resources import files
from urllib.parse import quote

from fastapi.templating import Jinja2Templates

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


templates.env.filters["visible"] = visible
templates.env.filters["quote"] = lambda text: quote(str(text), safe="")
templates.env.globals["heat"] = heat
