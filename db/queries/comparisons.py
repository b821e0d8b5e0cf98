"""Reference matching: how one SAE's latents are matched in another of the file by decoder
cosine, and all the SAEs side by side."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from saescope.db import codec
from saescope.db.codec import cosine_edges
from saescope.db.metrics import BEST_COSINE, DEFINITIONS
from saescope.db.models import Comparison as StoredComparison
from saescope.db.models import Feature, Match, Sae
from saescope.db.queries.external import ExternalResultOut, external_results
from saescope.db.queries.feature_detail import Histogram
from saescope.db.queries.feature_table import ROW_TOKENS
from saescope.db.queries.lookups import NotFoundError, TokenCount, sae_row, token_counts, vocab
from saescope.db.queries.paging import SortOrder, cursor, keyset
from saescope.db.queries.saes import AblationRule, SaeSummary, Training, shown_sae


class UnmatchedSort(StrEnum):
    frequency = "frequency"
    cosine = "cosine"
    feature_index = "feature_index"


# Random decoders put each latent's best cosine above their own highest with a chance of about
# 1/(latents + 1): about one latent in all, Poisson; more than this many, less than 1% of the time.
CHANCE_COUNT = 4


class PairSummary(BaseModel):
    sae: str
    other: str
    same_model_and_hook: bool = Field(
        description="false: the same input width, but another model or hook"
    )
    latents: int = Field(description="live latents of `sae`, over which the shares are taken")
    share_above_0_9: float = Field(description="share of them whose best cosine is above 0.9")
    share_above_0_8: float
    median_best_cosine: float
    chance_median_best_cosine: float = Field(
        description="the median best cosine that random unit decoders of the same shapes give"
    )
    chance_max_cosine: float = Field(
        description="the highest best cosine random decoders of the same shapes give: a "
        "latent's closest latent counts as a match only above it"
    )
    latents_above_chance: int = Field(
        description="live latents whose best cosine is above chance_max_cosine (chance itself: "
        "about one)"
    )
    above_chance: bool = Field(
        description=f"more than {CHANCE_COUNT} latents above chance_max_cosine, which random "
        "decoders give less than 1% of the time"
    )


class UnmatchedLatent(BaseModel):
    feature_index: int
    frequency: float = Field(description=DEFINITIONS["frequency"])
    closest: int = Field(description="its closest latent of the other SAE")
    cosine: float = Field(description=BEST_COSINE)
    specific_tokens: list[TokenCount]


class Comparison(PairSummary):
    histogram: Histogram = Field(description="of the best cosines of the live latents")
    chance_histogram: Histogram = Field(
        description="of the best cosines random unit decoders of the same shapes give"
    )
    threshold: float = Field(description="latents whose best cosine is below it are unmatched")
    unmatched_count: int
    sort: str
    order: str
    unmatched: list[UnmatchedLatent] = Field(description="live latents of `sae` with no match")
    next_cursor: str | None = Field(description="pass as `after` for the next page")


class SaeSideBySide(SaeSummary):
    training: Training | None
    threshold_ablation: list[AblationRule]
    external_results: list[ExternalResultOut] = Field(
        default=[], description="other tools' results imported with `saescope import-results`"
    )


class ConsistencySet(BaseModel):
    runs: list[str] = Field(
        description="SAEs of one model, hook, width and training objective: runs of one recipe"
    )
    reference: str = Field(description="an SAE of the same model and hook trained otherwise")


class SaeComparison(BaseModel):
    saes: list[SaeSideBySide]
    pairs: list[PairSummary] = Field(
        description="every comparison stored: each way between SAEs of the same input width"
    )
    consistency: list[ConsistencySet] = Field(
        description="the sets of runs the file holds, each with every reference it can be "
        "checked against (`/saes/{sae}/consistency`)"
    )


def consistency_sets(saes: list[SaeSideBySide]) -> list[ConsistencySet]:
    """Runs grouped by model, hook, width and objective (two or more), each with every SAE of
    the same model and hook whose objective differs."""

    def objective(sae: SaeSideBySide) -> str | None:
        return sae.training.objective if sae.training else None

    groups: dict[tuple, list[str]] = {}
    for sae in saes:
        if objective(sae) is not None:
            key = (sae.model, sae.hook, sae.d_sae, objective(sae))
            groups.setdefault(key, []).append(sae.name)
    return [
        ConsistencySet(runs=runs, reference=sae.name)
        for (model, hook, _, trained_with), runs in groups.items()
        if len(runs) > 1
        for sae in saes
        if (sae.model, sae.hook) == (model, hook) and objective(sae) != trained_with
    ]


def pair_summary(stored: StoredComparison, sae: str, other: str) -> PairSummary:
    given = {
        "sae": sae,
        "other": other,
        "above_chance": stored.latents_above_chance > CHANCE_COUNT,
    }
    return PairSummary(
        **given, **{key: getattr(stored, key) for key in PairSummary.model_fields.keys() - given}
    )


def compare_saes(
    session: Session,
    sae_name: str,
    other_name: str,
    *,
    threshold: float,
    sort: UnmatchedSort,
    order: SortOrder,
    after: str | None,
    limit: int,
) -> Comparison:
    """How `sae_name`'s latents are matched in `other_name` by decoder cosine, and one page of
    its live latents whose best cosine is below `threshold`."""
    sae, other = sae_row(session, sae_name), sae_row(session, other_name)
    stored = session.get(StoredComparison, (sae.id, other.id))
    if stored is None:
        if sae.id == other.id:
            reason = "an SAE is compared with other SAEs, not with itself"
        elif sae.d_in != other.d_in:
            reason = f"they read activations of different widths ({sae.d_in} and {other.d_in})"
        else:
            reason = f"run `saescope compare DATABASE {sae.name} {other.name}`"
        raise NotFoundError(f"no comparison of {sae.name!r} with {other.name!r}: {reason}")
    unmatched = (
        select(Match.feature_index, Match.other_feature_index, Match.cosine)
        .add_columns(Feature.frequency, Feature.specific_tokens)
        .join(
            Feature,
            and_(Feature.sae_id == Match.sae_id, Feature.feature_index == Match.feature_index),
        )
        .where(
            Match.sae_id == sae.id,
            Match.other_sae_id == other.id,
            Match.cosine < threshold,
            Feature.count > 0,
        )
    )
    count = session.scalar(select(func.count()).select_from(unmatched.subquery()))
    column = {
        UnmatchedSort.frequency: Feature.frequency,
        UnmatchedSort.cosine: Match.cosine,
        UnmatchedSort.feature_index: Match.feature_index,
    }[sort]
    rows = session.execute(
        keyset(unmatched, column, Match.feature_index, order, after, sort).limit(limit + 1)
    ).all()
    strings = vocab(session, sae.corpus_id)
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = cursor(getattr(last, sort.value), last.feature_index)
    columns = StoredComparison.__table__.c
    histograms = {
        name: Histogram(
            edges=cosine_edges().tolist(),
            counts=codec.unpack(
                columns[f"{name}_counts"], getattr(stored, f"{name}_counts")
            ).tolist(),
        )
        for name in ("histogram", "chance_histogram")
    }
    return Comparison(
        **pair_summary(stored, sae.name, other.name).model_dump(),
        **histograms,
        threshold=threshold,
        unmatched_count=count,
        sort=sort.value,
        order=order.value,
        unmatched=[
            UnmatchedLatent(
                feature_index=row.feature_index,
                frequency=row.frequency,
                closest=row.other_feature_index,
                cosine=row.cosine,
                specific_tokens=token_counts(row.specific_tokens[:ROW_TOKENS], strings),
            )
            for row in rows[:limit]
        ],
        next_cursor=next_cursor,
    )


def pair_summaries(session: Session, sae_name: str | None = None) -> list[PairSummary]:
    """The summaries of the stored comparisons (of one SAE with the others, if named)."""
    query = select(StoredComparison).order_by(
        StoredComparison.sae_id, StoredComparison.other_sae_id
    )
    if sae_name is not None:
        query = query.where(StoredComparison.sae_id == sae_row(session, sae_name).id)
    names = dict(session.execute(select(Sae.id, Sae.name)).tuples().all())
    return [
        pair_summary(pair, names[pair.sae_id], names[pair.other_sae_id])
        for pair in session.scalars(query)
    ]


def side_by_side(session: Session) -> SaeComparison:
    """Every SAE of the file with its metrics, training and threshold ablation, and every stored
    comparison's summary."""
    saes = [
        shown_sae(SaeSideBySide, sae, session).model_copy(
            update={"external_results": external_results(session, sae)}
        )
        for sae in session.scalars(select(Sae).order_by(Sae.id))
    ]
    return SaeComparison(
        saes=saes, pairs=pair_summaries(session), consistency=consistency_sets(saes)
    )
