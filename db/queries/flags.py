"""The flags report (counts and members of each flag), and the flags of one feature: the
definitions of `db.flags`, evaluated on stored rows and in SQL."""

from __future__ import annotations

from pydantic import BaseModel, Field
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from saescope.db.flags import COMPARISONS, FLAGS, FlagDefinition
from saescope.db.models import Feature
from saescope.db.queries.lookups import sae_row

# Members listed per flag.
FLAG_MEMBERS = 100


class Flag(BaseModel):
    name: str
    reason: str


class FlagGroup(BaseModel):
    name: str
    rule: str
    count: int
    measurable: int | None = Field(
        description="latents whose measure the flag reads can be taken (null: every latent's)"
    )
    features: list[int] = Field(
        description=f"up to {FLAG_MEMBERS} feature indices, most extreme first"
    )


class FlagsReport(BaseModel):
    sae: str
    threshold: float
    groups: list[FlagGroup]


def flags_of(feature: Feature, threshold: float) -> list[str]:
    """The flags a feature carries; `threshold` is the adjustable one (the SAE's build's)."""
    return [flag.name for flag in FLAGS if flag.holds(feature, threshold)]


def flag_reasons(feature: Feature, threshold: float) -> list[Flag]:
    return [
        Flag(name=flag.name, reason=flag.explain(feature, threshold))
        for flag in FLAGS
        if flag.holds(feature, threshold)
    ]


def flag_clause(flag: FlagDefinition, threshold: float):
    """The flag's conditions as an SQL expression over the features table."""
    return and_(
        *(
            COMPARISONS[condition.comparison](
                getattr(Feature, condition.column), flag.threshold_of(condition, threshold)
            )
            for condition in flag.conditions
        )
    )


def flags_report(session: Session, sae_name: str, threshold: float) -> FlagsReport:
    """Counts and members of each flag group, at `threshold` for the adjustable one (not the
    build's), which leads."""
    sae = sae_row(session, sae_name)
    groups = []
    for flag in sorted(FLAGS, key=lambda flag: flag.default_threshold is None):
        base = select(Feature.feature_index).where(
            Feature.sae_id == sae.id, flag_clause(flag, threshold)
        )
        ranked_by = getattr(Feature, flag.ranked_by)
        ordering = ranked_by.desc() if flag.descending else ranked_by.asc()
        count = session.scalar(select(func.count()).select_from(base.subquery()))
        members = session.scalars(
            base.order_by(ordering, Feature.feature_index).limit(FLAG_MEMBERS)
        )
        measurable = None
        if flag.measured_by is not None:
            measurable = session.scalar(
                select(func.count()).where(
                    Feature.sae_id == sae.id, getattr(Feature, flag.measured_by).is_not(None)
                )
            )
        groups.append(
            FlagGroup(
                name=flag.name,
                rule=flag.rule.format(threshold=threshold),
                count=count,
                measurable=measurable,
                features=list(members),
            )
        )
    return FlagsReport(sae=sae.name, threshold=threshold, groups=groups)
