"""Consistency across training runs (Farrell): the latents of one run that recur in every other
run of a set (a best decoder cosine at or above a threshold in each) but have no match in any
reference SAE, read from the stored reference matches."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, aliased

from saescope.db.metrics import BEST_COSINE, DEFINITIONS
from saescope.db.models import Comparison as StoredComparison
from saescope.db.models import Feature, Match
from saescope.db.queries.feature_table import ROW_TOKENS
from saescope.db.queries.lookups import (
    BadRequestError,
    NotFoundError,
    TokenCount,
    sae_row,
    token_counts,
    vocab,
)
from saescope.db.queries.paging import SortOrder, cursor, keyset


class ConsistencySort(StrEnum):
    frequency = "frequency"
    feature_index = "feature_index"


class BestMatch(BaseModel):
    sae: str
    feature_index: int = Field(description="the closest live latent of `sae`")
    cosine: float = Field(description=BEST_COSINE)


class PairChance(BaseModel):
    sae: str
    chance_max_cosine: float = Field(
        description="the highest best cosine random unit decoders of the anchor's and this "
        "SAE's shapes give"
    )


class ConsistentLatent(BaseModel):
    feature_index: int
    frequency: float = Field(description=DEFINITIONS["frequency"])
    specific_tokens: list[TokenCount]
    in_runs: list[BestMatch] = Field(description="its best match in each other run")
    in_reference: list[BestMatch] = Field(description="its best match in each reference SAE")


class Consistency(BaseModel):
    anchor: str = Field(description="the first of `runs`: the SAE whose latents are listed")
    runs: list[str]
    reference: list[str]
    threshold: float = Field(description="a best cosine at or above it is a match")
    chance: list[PairChance] = Field(
        description="per other SAE, what random decoders reach: a threshold at or below it "
        "counts chance as a match"
    )
    threshold_above_chance: bool = Field(
        description="the threshold is above every pair's chance_max_cosine"
    )
    live_latents: int = Field(description="live latents of the anchor")
    recurring: int = Field(description="live latents of the anchor with a match in every other run")
    count: int = Field(description="of those, the ones with no match in any reference SAE")
    sort: str
    order: str
    latents: list[ConsistentLatent]
    next_cursor: str | None = Field(description="pass as `after` for the next page")


def consistency(
    session: Session,
    runs: list[str],
    reference: list[str],
    *,
    threshold: float,
    sort: ConsistencySort,
    order: SortOrder,
    after: str | None,
    limit: int,
) -> Consistency:
    """The live latents of `runs[0]` whose best match in each other run is at or above
    `threshold` and whose best match in every reference SAE is below it, one page of them."""
    names = runs + reference
    if not runs or not reference:
        raise BadRequestError("name at least one run and one reference SAE")
    if len(set(names)) != len(names):
        raise BadRequestError("each SAE may be named once, in the runs or in the reference")
    anchor, *others = (sae_row(session, name) for name in names)
    pairs = [session.get(StoredComparison, (anchor.id, other.id)) for other in others]
    for other, stored in zip(others, pairs, strict=True):
        if stored is None:
            raise NotFoundError(
                f"no comparison of {anchor.name!r} with {other.name!r}: "
                f"run `saescope compare DATABASE {anchor.name} {other.name}`"
            )
    live = and_(Feature.sae_id == anchor.id, Feature.count > 0)
    query = select(Feature.feature_index, Feature.frequency, Feature.specific_tokens).where(live)
    matches = []
    for position, other in enumerate(others):
        match = aliased(Match)
        matches.append(match)
        is_run = position < len(runs) - 1
        query = query.join(
            match,
            and_(
                match.sae_id == anchor.id,
                match.other_sae_id == other.id,
                match.feature_index == Feature.feature_index,
            ),
        ).add_columns(match.other_feature_index, match.cosine)
        if is_run:
            query = query.where(match.cosine >= threshold)
    recurring = session.scalar(select(func.count()).select_from(query.subquery()))
    for match in matches[len(runs) - 1 :]:
        query = query.where(match.cosine < threshold)
    count = session.scalar(select(func.count()).select_from(query.subquery()))
    column = {
        ConsistencySort.frequency: Feature.frequency,
        ConsistencySort.feature_index: Feature.feature_index,
    }[sort]
    rows = session.execute(
        keyset(query, column, Feature.feature_index, order, after, sort).limit(limit + 1)
    ).all()
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = cursor(getattr(last, sort.value), last.feature_index)
    strings = vocab(session, anchor.corpus_id)

    def best_matches(row, start: int, stop: int) -> list[BestMatch]:
        """The row's matches in others[start:stop] (their columns follow the feature's)."""
        return [
            BestMatch(sae=others[i].name, feature_index=row[3 + 2 * i], cosine=row[4 + 2 * i])
            for i in range(start, stop)
        ]

    chance = [
        PairChance(sae=other.name, chance_max_cosine=stored.chance_max_cosine)
        for other, stored in zip(others, pairs, strict=True)
    ]
    return Consistency(
        anchor=anchor.name,
        runs=runs,
        reference=reference,
        threshold=threshold,
        chance=chance,
        threshold_above_chance=all(threshold > pair.chance_max_cosine for pair in chance),
        live_latents=session.scalar(select(func.count()).select_from(Feature).where(live)),
        recurring=recurring,
        count=count,
        sort=sort.value,
        order=order.value,
        latents=[
            ConsistentLatent(
                feature_index=row.feature_index,
                frequency=row.frequency,
                specific_tokens=token_counts(row.specific_tokens[:ROW_TOKENS], strings),
                in_runs=best_matches(row, 0, len(runs) - 1),
                in_reference=best_matches(row, len(runs) - 1, len(others)),
            )
            for row in rows[:limit]
        ],
        next_cursor=next_cursor,
    )
