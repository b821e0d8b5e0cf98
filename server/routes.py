"""Every route's path, named once: the JSON API's (under `API`) and the HTML pages'. The routers
register these paths by name, and `urls` builds every link from them."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

API = "/api/v1"


@dataclass(frozen=True)
class Route:
    json: str | None
    """path under API; None: a page with no data of its own"""
    page: str | None = None
    """path of the HTML page that shows the same object; None: JSON only"""


# Pages whose JSON twin is the same path under API.
_TWINS = {
    "sae": "/saes/{sae}",
    "comparison": "/compare",
    "compare_pair": "/saes/{sae}/compare/{other}",
    "consistency": "/saes/{sae}/consistency",
    "feature": "/saes/{sae}/features/{feature_index}",
    "text_test": "/saes/{sae}/test",
    "search": "/saes/{sae}/search",
    "corpus_search": "/saes/{sae}/corpus",
    "flags": "/saes/{sae}/flags",
}
ROUTES = {name: Route(at, page=at) for name, at in _TWINS.items()} | {
    "saes": Route("/saes", page="/"),
    "jump": Route(None, page="/saes/{sae}/jump"),
    "health": Route("/health"),
    "threshold_ablation": Route("/saes/{sae}/threshold-ablation"),
    "features": Route("/saes/{sae}/features"),
    "labels": Route("/saes/{sae}/labels"),
    "label": Route("/saes/{sae}/features/{feature_index}/label"),
    "activations": Route("/saes/{sae}/activations"),
    "steer": Route("/saes/{sae}/steer"),
}


def path(name: str, api: bool = False, **parameters: str | int) -> str:
    """The path of route `name` (its JSON route's with `api`), its parameters quoted."""
    route = ROUTES[name]
    template = route.json if api else route.page
    if template is None:
        raise KeyError(f"route {name!r} has no {'JSON route' if api else 'page'}")
    if api:
        template = API + template
    return template.format(**{key: quote(str(value), safe="") for key, value in parameters.items()})
