"""The SAEs of the file: their metrics, build configuration, training, threshold ablation."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from saescope.db.models import Sae
from saescope.db.queries.lookups import sae_row


class SaeSummary(BaseModel):
    name: str
    model: str
    hook: str
    architecture: str
    d_in: int
    d_sae: int
    context_length: int
    tokens_seen: int
    l0: float
    mse: float
    explained_variance: float | None
    ce_clean: float | None = Field(description="null without a language model (synthetic data)")
    ce_sae: float | None
    ce_zero: float | None
    ce_score: float | None
    dead_count: int
    dense_count: int
    high_frequency_threshold: float
    mmcs: float | None = Field(
        description="synthetic data: mean over true features of the best decoder cosine"
    )
    recovered_share: float | None = Field(
        description="synthetic data: share of true features with a latent at cosine > 0.9"
    )
    description_length_bits: float = Field(
        description="bits per token to send the SAE's activations: the sum of its latents' "
        "description lengths"
    )
    description_length_precision: int = Field(
        description="bins per decade the activations are quantised to: the coarsest that raises "
        "the reconstruction's MSE by at most 5%"
    )


class Training(BaseModel):
    objective: str | None
    hyperparameters: dict[str, Any] = Field(
        description="the objective's own settings, and the dictionary size, tokens and "
        "learning rate"
    )
    settings: dict[str, Any] = Field(description="every setting of `saescope train`")


class SaeDetail(SaeSummary):
    eval_tokens: int
    config: dict[str, Any]
    training: Training | None = Field(description="for SAEs trained by `saescope train`")
    training_log: list[dict[str, Any]] | None


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
    sae: str
    eval_tokens: int
    ce_clean: float | None
    ce_zero: float | None
    rules: list[AblationRule]


def list_saes(session: Session) -> list[SaeSummary]:
    saes = session.scalars(select(Sae).order_by(Sae.id))
    return [SaeSummary.model_validate(sae, from_attributes=True) for sae in saes]


def get_sae(session: Session, name: str) -> SaeDetail:
    return SaeDetail.model_validate(sae_row(session, name), from_attributes=True)


def threshold_ablation(session: Session, sae_name: str) -> ThresholdAblation:
    sae = sae_row(session, sae_name)
    return ThresholdAblation(
        sae=sae.name,
        eval_tokens=sae.eval_tokens,
        ce_clean=sae.ce_clean,
        ce_zero=sae.ce_zero,
        rules=sae.threshold_ablation,
    )
