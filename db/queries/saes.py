"""The SAEs of the file: their metrics, build configuration, training, threshold ablation."""

from __future__ import annotations

import os
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, Field, create_model
from sqlalchemy import select
from sqlalchemy.orm import Session

from saescope.db.models import Sae
from saescope.db.queries.lookups import sae_row


class Training(BaseModel):
    objective: str | None
    hyperparameters: dict[str, Any] = Field(
        description="the objective's own settings, and the dictionary size, tokens and "
        "learning rate"
    )
    settings: dict[str, Any] = Field(description="every setting of `saescope train`")


def _shown_fields(level: str, **types: Any) -> dict[str, Any]:
    """The columns of the SAE table shown at `level` (`models.shown`), as response fields, in
    table order; `types` overrides a column's type."""
    hints = typing.get_type_hints(Sae)
    return {
        column.key: (
            types.get(column.key) or typing.get_args(hints[column.key])[0],
            Field(description=column.info["description"]),
        )
        for column in Sae.__table__.columns
        if column.info.get("shown") == level
    }


SaeSummary = create_model("SaeSummary", **_shown_fields("summary"))
SaeDetail = create_model(
    "SaeDetail", __base__=SaeSummary, **_shown_fields("detail", training=Training | None)
)


class AblationPoint(BaseModel):
    threshold: float = Field(
        description="the rule's knob: the threshold (global), k (lowest_k), the fraction of each "
        "latent's max (fraction_of_max) or the quantile level (quantile); 0 is the SAE itself"
    )
    l0: float = Field(description="active latents per token on the evaluation contexts")
    mse: float
    explained_variance: float | None
    ce: float | None = Field(
        description="cross-entropy with the thresholded reconstruction spliced in (null without "
        "a language model)"
    )


class AblationRule(BaseModel):
    name: str
    rule: str = Field(description="what the rule removes")
    points: list[AblationPoint]


class ThresholdAblation(BaseModel):
    """Read from the SAE's row: its name and its threshold-ablation column are `sae`, `rules`."""

    sae: str = Field(validation_alias="name")
    eval_tokens: int
    ce_clean: float | None
    ce_zero: float | None
    rules: list[AblationRule] = Field(validation_alias="threshold_ablation")


# The session's `info` key of the directory that local paths are shown relative to (the server
# sets it to the database's): responses never show where the files sit on the machine.
PATHS_RELATIVE_TO = "paths_relative_to"
# The build settings that hold local paths.
PATH_SETTINGS = ("model", "sae", "corpus", "synthetic")
Shown = TypeVar("Shown", bound=BaseModel)


def shown_sae(model: type[Shown], sae: Sae, session: Session) -> Shown:
    """`sae` as `model` shows it, its local paths relative to PATHS_RELATIVE_TO when set."""
    shown = model.model_validate(sae, from_attributes=True)
    base = session.info.get(PATHS_RELATIVE_TO)
    if base is None:
        return shown

    def relative(value: Any) -> Any:
        return (
            os.path.relpath(value, base)
            if isinstance(value, str) and value.startswith("/")
            else value
        )

    updates: dict[str, Any] = {"model": relative(shown.model)}
    config = getattr(shown, "config", None)
    if config:
        updates["config"] = config | {key: relative(config.get(key)) for key in PATH_SETTINGS}
    return shown.model_copy(update=updates)


def list_saes(session: Session) -> list[SaeSummary]:
    saes = session.scalars(select(Sae).order_by(Sae.id))
    return [shown_sae(SaeSummary, sae, session) for sae in saes]


def get_sae(session: Session, name: str) -> SaeDetail:
    return shown_sae(SaeDetail, sae_row(session, name), session)


def threshold_ablation(session: Session, sae_name: str) -> ThresholdAblation:
    return ThresholdAblation.model_validate(sae_row(session, sae_name), from_attributes=True)
