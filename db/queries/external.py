"""Other tools' results stored with an SAE (`saescope import-results`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from saescope.db.models import ExternalLatentResult, ExternalResult, Sae


class ExternalResultOut(BaseModel):
    tool: str = Field(description="the tool that evaluated the SAE (SAEBench)")
    eval_type: str = Field(description="its eval (core, absorption_first_letter, ...)")
    source: str = Field(description="the result file it was read from")
    evaluated_at: str | None
    imported_at: str
    metrics: dict[str, dict[str, Any]] = Field(
        description="{group: {metric: value}} as the tool reported them; null where it could not "
        "compute one"
    )
    details: list[Any] = Field(description="its details other than per latent (per letter, ...)")
    config: dict[str, Any]


class ExternalLatentOut(BaseModel):
    tool: str
    eval_type: str
    source: str
    values: dict[str, Any] = Field(description="the tool's values for this latent")


def external_results(session: Session, sae: Sae) -> list[ExternalResultOut]:
    rows = session.scalars(
        select(ExternalResult)
        .where(ExternalResult.sae_id == sae.id)
        .order_by(ExternalResult.tool, ExternalResult.eval_type)
    )
    return [ExternalResultOut.model_validate(row, from_attributes=True) for row in rows]


def external_latent_results(
    session: Session, sae: Sae, feature_index: int
) -> list[ExternalLatentOut]:
    rows = session.execute(
        select(ExternalLatentResult, ExternalResult.source)
        .join(
            ExternalResult,
            (ExternalResult.sae_id == ExternalLatentResult.sae_id)
            & (ExternalResult.tool == ExternalLatentResult.tool)
            & (ExternalResult.eval_type == ExternalLatentResult.eval_type),
        )
        .where(
            ExternalLatentResult.sae_id == sae.id,
            ExternalLatentResult.feature_index == feature_index,
        )
        .order_by(ExternalLatentResult.tool, ExternalLatentResult.eval_type)
    )
    return [
        ExternalLatentOut(tool=row.tool, eval_type=row.eval_type, source=source, values=row.values)
        for row, source in rows
    ]
