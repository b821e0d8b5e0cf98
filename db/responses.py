"""The shapes of what the query layer returns: pydantic models, so the JSON API's field names are
these models' field names and OpenAPI documents them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


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


class SaeDetail(SaeSummary):
    eval_tokens: int
    config: dict[str, Any]
    training_log: list[dict[str, Any]] | None


class TokenCount(BaseModel):
    token_id: int
    token: str
    count: int
    mean_activation: float


class FeatureRow(BaseModel):
    feature_index: int
    frequency: float
    mean_activation: float
    max_activation: float
    jaccard: float
    miss_rate: float
    present_miss_rate: float | None
    flags: list[str]
    top_tokens: list[TokenCount]


class FeaturePage(BaseModel):
    sae: str
    sort: str
    order: str
    items: list[FeatureRow]
    next_cursor: str | None = Field(description="pass as `after` for the next page")


class Flag(BaseModel):
    name: str
    reason: str


class ExampleOut(BaseModel):
    sequence_index: int
    position: int
    activation: float
    projection: float | None = None
    tokens: list[str]
    token_ids: list[int]
    activations: list[float]
    focus: int = Field(description="index of the example's token within the window")


class QuantileBand(BaseModel):
    band: int
    lower: float
    upper: float
    mass_share: float = Field(description="share of the feature's summed activation in the band")
    examples: list[ExampleOut]


class Examples(BaseModel):
    top: list[ExampleOut]
    bottom: list[ExampleOut]
    quantiles: list[QuantileBand]
    decoder_top: list[ExampleOut]


class Absorber(BaseModel):
    feature_index: int
    weight: float = Field(
        description="Σ f_j·(ŵ_i·W_dec[j]) over the missed sampled positions examined (≤ 64)"
    )
    share: float = Field(description="weight / Σ p_i over the same positions")
    count: int = Field(description="of those positions, how many it fires on")


class EncoderDecoder(BaseModel):
    jaccard: float = Field(description="Jaccard overlap of the top and decoder-top positions")
    miss_rate: float = Field(description="share of decoder-top positions where f_i = 0")
    present_miss_rate: float | None = Field(
        description="share of sampled positions with p_i at or above its median firing "
        "projection where f_i = 0; null when it fires on too few sampled positions"
    )
    present_positions: int = Field(description="sampled positions where p_i reaches it")
    sample_positions: int = Field(description="size of the SAE's uniform position sample")
    absorbers: list[Absorber] = Field(description="latents active on the missed positions")


class Histogram(BaseModel):
    edges: list[float]
    counts: list[int]


class Positional(BaseModel):
    firing_rate: list[float]
    mean_activation: list[float]


class LogitEffect(BaseModel):
    token_id: int
    token: str
    logit: float


class Neighbour(BaseModel):
    feature_index: int
    cosine: float


class GroundTruth(BaseModel):
    """Synthetic data only: the true feature closest to this latent's decoder direction, and
    the closest normalised sum of two true features."""

    feature: str
    cosine: float
    composed: bool = Field(description="closer to the sum of two true features than to any one")
    composed_of: list[str]
    composed_cosine: float


class FeatureDetail(BaseModel):
    sae: str
    feature_index: int
    d_sae: int
    count: int
    frequency: float
    mean_activation: float
    max_activation: float
    bos_share: float
    positional_r2: float
    flags: list[Flag]
    examples: Examples
    encoder_decoder: EncoderDecoder
    histogram: Histogram
    positional: Positional
    logits_top: list[LogitEffect]
    logits_bottom: list[LogitEffect]
    neighbours: list[Neighbour]
    top_tokens: list[TokenCount]
    ground_truth: GroundTruth | None


class LatentForToken(BaseModel):
    feature_index: int
    count: int
    mean_activation: float
    examples: list[ExampleOut]


class TokenMatch(BaseModel):
    token_id: int
    token: str
    exact: bool
    count: int
    latents: list[LatentForToken]


class TokenSearch(BaseModel):
    sae: str
    query: str
    matches: list[TokenMatch]


class FlagGroup(BaseModel):
    name: str
    rule: str
    count: int
    features: list[int] = Field(description="up to `limit` feature indices, most extreme first")


class FlagsReport(BaseModel):
    sae: str
    threshold: float
    groups: list[FlagGroup]
