"""Every URL the pages link to, built in one place (as datasette's `Urls`) from the named routes
of `routes`: path segments and query values are quoted here, and each page's JSON twin is its
route's JSON path."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import URL

from saescope.db.flags import FLAGS_BY_NAME
from saescope.server import assets
from saescope.server.routes import path


def _with_query(at: str, query: dict[str, object]) -> str:
    given = {name: value for name, value in query.items() if value is not None}
    return f"{at}?{urlencode(given)}" if given else at


def index() -> str:
    return path("saes")


def feature_table(sae: str, **query: object) -> str:
    """The SAE's page, whose table takes these query parameters."""
    return _with_query(path("sae", sae=sae), query)


def feature(sae: str, feature_index: int | str, table: str = "") -> str:
    """A feature; `table`: the query string of the feature-table page it was opened from, which
    its breadcrumb goes back to."""
    return _with_query(
        path("feature", sae=sae, feature_index=feature_index), {"table": table or None}
    )


def jump(sae: str) -> str:
    """Redirects `?feature=N` to feature N."""
    return path("jump", sae=sae)


def feature_table_from(sae: str, table: str | None) -> str:
    """The feature-table page whose query string is `table` (only its parameters are kept)."""
    return _with_query(feature_table(sae), dict(parse_qsl(table or "")))


def activations(sae: str) -> str:
    """The JSON route that runs the SAE on a text (POST)."""
    return path("activations", api=True, sae=sae)


def steer(sae: str) -> str:
    """The JSON route that continues a prompt with latents steered (POST)."""
    return path("steer", api=True, sae=sae)


def label(sae: str, feature_index: int) -> str:
    """A latent's label (PUT, DELETE)."""
    return path("label", api=True, sae=sae, feature_index=feature_index)


def text_test(sae: str) -> str:
    """The page to run the SAE on a text of one's own."""
    return path("text_test", sae=sae)


def search(sae: str, token: str | None = None) -> str:
    return _with_query(path("search", sae=sae), {"token": token})


def corpus_search(sae: str, phrase: str | None = None, **query: object) -> str:
    """Phrase search over the corpus's text."""
    return _with_query(path("corpus_search", sae=sae), {"phrase": phrase, **query})


def flags(sae: str, threshold: float | None = None) -> str:
    return _with_query(path("flags", sae=sae), {"threshold": threshold})


def flag_members(sae: str, flag_name: str, threshold: float) -> str:
    """The feature table showing a flag's members; for the adjustable flag (high frequency), at
    `threshold` rather than the build's: ranked by frequency above it."""
    flag = FLAGS_BY_NAME[flag_name]
    if flag.default_threshold is None:
        return feature_table(sae, flag=flag.name)
    return feature_table(sae, sort=flag.ranked_by, order="desc", min_frequency=threshold)


def sae(name: str) -> str:
    """An SAE: its page is the feature table."""
    return feature_table(name)


def comparison() -> str:
    """The SAEs of the file side by side."""
    return path("comparison")


def compare_pair(sae: str, other: str, **query: object) -> str:
    return _with_query(path("compare_pair", sae=sae, other=other), query)


def consistency(sae: str, runs: list[str], reference: list[str], **query: object) -> str:
    """`sae`'s latents that recur in `runs` but have no match in `reference`."""
    given = {name: value for name, value in query.items() if value is not None}
    pairs = [("runs", run) for run in runs] + [("reference", name) for name in reference]
    return f"{path('consistency', sae=sae)}?{urlencode(pairs + list(given.items()))}"


def token_search_prefix(sae: str) -> str:
    """The search URL up to the token, which the caller quotes and appends."""
    return f"{path('search', sae=sae)}?token="


def static(name: str) -> str:
    """A static file, at a URL that changes with its content (so it may be cached for good)."""
    return f"/static/{name}?v={assets.version(name)}"


def same_page(url: URL, **changes: object) -> str:
    """The page at `url` with some query parameters changed (None removes one), the others kept."""
    query: dict[str, object] = dict(parse_qsl(url.query, keep_blank_values=True))
    query.update(changes)
    return _with_query(url.path, query)


def json_twin(url: URL, name: str, **parameters: str | int) -> str:
    """The JSON twin of the page at `url`, the view `name`: its JSON route, with the page's query
    string."""
    at = path(name, api=True, **parameters)
    return f"{at}?{url.query}" if url.query else at
