"""Every URL the pages link to, built in one place (as datasette's `Urls`): path segments and
query values are quoted here, and each page's JSON twin is the same path under API."""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, urlencode

from starlette.datastructures import URL

from saescope.db.flags import FLAGS_BY_NAME
from saescope.server import assets

API = "/api/v1"


def _segment(text: str | int) -> str:
    return quote(str(text), safe="")


def _with_query(path: str, query: dict[str, object]) -> str:
    given = {name: value for name, value in query.items() if value is not None}
    return f"{path}?{urlencode(given)}" if given else path


def index() -> str:
    return "/"


def feature_table(sae: str, api: bool = False, **query: object) -> str:
    """The feature table (its JSON twin: the features list), with query parameters."""
    path = f"{API}/saes/{_segment(sae)}/features" if api else f"/saes/{_segment(sae)}"
    return _with_query(path, query)


def feature(sae: str, feature_index: int | str, api: bool = False, table: str = "") -> str:
    """A feature; `table`: the query string of the feature-table page it was opened from, which
    its breadcrumb goes back to."""
    path = f"{API if api else ''}/saes/{_segment(sae)}/features/{feature_index}"
    return _with_query(path, {"table": table or None})


def jump(sae: str) -> str:
    """Redirects `?feature=N` to feature N."""
    return f"/saes/{_segment(sae)}/jump"


def feature_table_from(sae: str, table: str | None) -> str:
    """The feature-table page whose query string is `table` (only its parameters are kept)."""
    return _with_query(feature_table(sae), dict(parse_qsl(table or "")))


def activations(sae: str) -> str:
    """The JSON route that runs the SAE on a text (POST)."""
    return f"{API}/saes/{_segment(sae)}/activations"


def label(sae: str, feature_index: int) -> str:
    """A latent's label (PUT, DELETE)."""
    return f"{API}/saes/{_segment(sae)}/features/{feature_index}/label"


def test_text(sae: str) -> str:
    """The page to run the SAE on a text of one's own."""
    return f"/saes/{_segment(sae)}/test"


def search(sae: str, token: str | None = None, api: bool = False) -> str:
    path = f"{API if api else ''}/saes/{_segment(sae)}/search"
    return _with_query(path, {"token": token})


def corpus_search(sae: str, phrase: str | None = None, api: bool = False, **query: object) -> str:
    """Phrase search over the corpus's text."""
    path = f"{API if api else ''}/saes/{_segment(sae)}/corpus"
    return _with_query(path, {"phrase": phrase, **query})


def flags(sae: str, threshold: float | None = None, api: bool = False) -> str:
    return _with_query(f"{API if api else ''}/saes/{_segment(sae)}/flags", {"threshold": threshold})


def flag_members(sae: str, flag_name: str, threshold: float) -> str:
    """The feature table showing a flag's members; for the adjustable flag (high frequency), at
    `threshold` rather than the build's: ranked by frequency above it."""
    flag = FLAGS_BY_NAME[flag_name]
    if flag.default_threshold is None:
        return feature_table(sae, flag=flag.name)
    return feature_table(sae, sort=flag.ranked_by, order="desc", min_frequency=threshold)


def sae(name: str, api: bool = False) -> str:
    """An SAE: its page is the feature table; its JSON, its metrics and configuration."""
    return f"{API}/saes/{_segment(name)}" if api else feature_table(name)


def saes(api: bool = False) -> str:
    return f"{API}/saes" if api else index()


def comparison(api: bool = False) -> str:
    """The SAEs of the file side by side."""
    return f"{API if api else ''}/compare"


def compare_pair(sae: str, other: str, api: bool = False, **query: object) -> str:
    path = f"{API if api else ''}/saes/{_segment(sae)}/compare/{_segment(other)}"
    return _with_query(path, query)


def threshold_ablation(sae: str) -> str:
    """JSON only: the SAE page draws it."""
    return f"{API}/saes/{_segment(sae)}/threshold-ablation"


def token_search_prefix(sae: str) -> str:
    """The search URL up to the token, which the caller quotes and appends."""
    return f"/saes/{_segment(sae)}/search?token="


def static(name: str) -> str:
    """A static file, at a URL that changes with its content (so it may be cached for good)."""
    return f"/static/{name}?v={assets.version(name)}"


def same_page(url: URL, **changes: object) -> str:
    """The page at `url` with some query parameters changed (None removes one), the others kept."""
    query: dict[str, object] = dict(parse_qsl(url.query, keep_blank_values=True))
    query.update(changes)
    return _with_query(url.path, query)


def json_twin(url: URL, api_path: str) -> str:
    """The JSON twin of the page at `url`: `api_path` with the page's query string."""
    return f"{api_path}?{url.query}" if url.query else api_path
