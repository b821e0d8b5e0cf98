"""The feature table: one row per latent with its table metrics (`db.metrics`), flags and top
tokens, filtered, sorted by any sortable metric and paginated by key; and the short summary
lists of latents show inline."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Mapping
from enum import StrEnum

from pydantic import BaseModel, Field, create_model
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from saescope.db.explanations import SCORES
from saescope.db.flags import FLAGS_BY_NAME, FlagName
from saescope.db.metrics import METRICS_BY_NAME, SORTABLE, TABLE_COLUMNS, response_fields
from saescope.db.models import Feature, Sae
from saescope.db.queries.flags import flag_clause, flags_of
from saescope.db.queries.lookups import BadRequestError, TokenCount, sae_row, token_counts, vocab
from saescope.db.queries.paging import SortOrder, cursor, keyset, parse_cursor

SortKey = StrEnum("SortKey", ["feature_index", *(metric.name for metric in SORTABLE), *SCORES])
# Specific tokens shown per row.
ROW_TOKENS = 5
# Metrics that may be None (not measurable) sort as if they were this: below every value, so
# last in descending order.
UNMEASURED = -1.0

FeatureRow = create_model(
    "FeatureRow",
    feature_index=(int, ...),
    **response_fields(TABLE_COLUMNS),
    flags=(list[str], ...),
    specific_tokens=(list[TokenCount], ...),
)


class FeaturePage(BaseModel):
    sae: str
    sort: str
    order: str
    items: list[FeatureRow]
    total: int = Field(description="features that match the filters, on every page")
    next_cursor: str | None = Field(description="pass as `after` for the next page")
    previous_cursor: str | None = Field(None, description="pass as `before` for the previous page")


def list_features(
    session: Session,
    sae_name: str,
    *,
    sort: SortKey,
    order: SortOrder,
    flag: FlagName | None,
    min_frequency: float | None,
    max_frequency: float | None,
    after: str | None,
    limit: int,
    before: str | None,
    scores: Mapping[int, float] | None = None,
) -> FeaturePage:
    """One page of the feature table, paginated by key: the rows after the cursor `after` (a
    page's `next_cursor`) or before the cursor `before` (its `previous_cursor`); with the count
    of rows that match the filters. Sorted by an explanation score, `scores` gives each scored
    latent's (the others sort as unmeasured)."""
    if min_frequency is not None and max_frequency is not None and min_frequency > max_frequency:
        raise BadRequestError("min_frequency is greater than max_frequency")
    if after is not None and before is not None:
        raise BadRequestError("give after or before, not both")
    sae = sae_row(session, sae_name)
    threshold = sae.high_frequency_threshold
    query = select(Feature).where(Feature.sae_id == sae.id)
    if flag is not None:
        query = query.where(flag_clause(FLAGS_BY_NAME[flag.value], threshold))
    if min_frequency is not None:
        query = query.where(Feature.frequency >= min_frequency)
    if max_frequency is not None:
        query = query.where(Feature.frequency <= max_frequency)
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    backward = before is not None
    if sort.value in SCORES:
        scores = scores or {}
        features = _ranked_by_scores(
            session, query, scores, order, before or after, sort, backward, limit
        )
    else:
        query = keyset(
            query, _sort_column(sort), Feature.feature_index, order, before or after, sort, backward
        )
        features = list(session.scalars(query.limit(limit + 1)))
    more = len(features) > limit
    features = features[:limit]
    if backward:
        features.reverse()
    strings = vocab(session, sae.corpus_id)
    items = [
        FeatureRow(
            feature_index=f.feature_index,
            **{metric.name: getattr(f, metric.name) for metric in TABLE_COLUMNS},
            flags=flags_of(f, threshold),
            specific_tokens=token_counts(f.specific_tokens[:ROW_TOKENS], strings),
        )
        for f in features
    ]
    # Going forward there are rows before this page if it started after one; going backward,
    # rows after it (the one it started before).
    has_next, has_previous = (True, more) if backward else (more, after is not None)
    return FeaturePage(
        sae=sae.name,
        sort=sort.value,
        order=order.value,
        items=items,
        total=total,
        next_cursor=_cursor_of(features[-1], sort, scores) if has_next and features else None,
        previous_cursor=_cursor_of(features[0], sort, scores)
        if has_previous and features
        else None,
    )


def _ranked_by_scores(
    session: Session,
    query,
    scores: Mapping[int, float],
    order: SortOrder,
    cursor_text: str | None,
    sort: SortKey,
    backward: bool,
    limit: int,
) -> list[Feature]:
    """The rows of `query` after (or, `backward`, before) the cursor in the order of `keyset`,
    by scores kept outside the database: ranked here, since SQLite cannot join a few thousand
    bound values to a table without scanning them once per row."""
    descending = order is SortOrder.desc

    def key(value: float, index: int) -> tuple[float, int]:
        return (-value if descending else value, index)

    indices = session.scalars(query.with_only_columns(Feature.feature_index))
    ranked = sorted(key(scores.get(index, UNMEASURED), index) for index in indices)
    if cursor_text is None:
        start, end = 0, len(ranked)
    else:
        bound = key(*parse_cursor(cursor_text, sort))
        start, end = (
            (0, bisect_left(ranked, bound))
            if backward
            else (bisect_right(ranked, bound), len(ranked))
        )
    page = (
        ranked[max(start, end - limit - 1) : end][::-1]
        if backward
        else ranked[start : start + limit + 1]
    )
    wanted = [index for _, index in page]
    rows = session.scalars(query.where(Feature.feature_index.in_(wanted)))
    by_index = {feature.feature_index: feature for feature in rows}
    return [by_index[index] for index in wanted]


def _nullable(sort: SortKey) -> bool:
    metric = METRICS_BY_NAME.get(sort.value)
    return metric is not None and metric.nullable


def _sort_column(sort: SortKey):
    column = getattr(Feature, sort.value)
    return func.coalesce(column, UNMEASURED) if _nullable(sort) else column


def _cursor_of(feature: Feature, sort: SortKey, scores: Mapping[int, float] | None) -> str:
    if sort.value in SCORES:
        value = (scores or {}).get(feature.feature_index)
    else:
        value = getattr(feature, sort.value)
    return cursor(UNMEASURED if value is None else value, feature.feature_index)


class LatentSummary(BaseModel):
    """A latent as lists of latents show it inline."""

    frequency: float
    specific_tokens: list[TokenCount]


def latent_summaries(
    session: Session, sae: Sae, indices: list[int], n_tokens: int = 3
) -> dict[int, LatentSummary]:
    """Frequency and the tokens it is most specific to, of each latent listed (one query), for
    lists of latents shown inline."""
    if not indices:
        return {}
    strings = vocab(session, sae.corpus_id)
    rows = session.execute(
        select(Feature.feature_index, Feature.frequency, Feature.specific_tokens).where(
            Feature.sae_id == sae.id, Feature.feature_index.in_(sorted(set(indices)))
        )
    )
    return {
        index: LatentSummary(
            frequency=frequency, specific_tokens=token_counts(tokens[:n_tokens], strings)
        )
        for index, frequency, tokens in rows
    }
