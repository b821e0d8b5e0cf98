"""The shapes of what the query layer returns: pydantic models, so the JSON API's field names are
these models' field names and OpenAPI documents them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

# One line per measure: the API documents each field with it, the pages show it beside the number.
DEFINITIONS = {
    "frequency": "share of the corpus tokens (special tokens aside) where the latent fires",
    "mean_activation": "mean activation where the latent fires",
    "max_activation": "highest activation on the corpus",
    "jaccard": "overlap (Jaccard) of the positions of its top activations and of its top "
    "decoder-direction projections",
    "miss_rate": "share of its top decoder-direction projections where the latent stays at zero",
    "absorption": "share of the strong writes along its decoder direction that other latents "
    "make where it stays off (null: not measurable, see absorption_reason)",
    "decoder_auroc": "how well its decoder projection singles out where it fires: AUROC, its "
    "firings against positions where neither it nor a close latent fires",
}


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
    jaccard: float = Field(description=DEFINITIONS["jaccard"])
    miss_rate: float = Field(description=DEFINITIONS["miss_rate"])
    absorption: float | None = Field(description=DEFINITIONS["absorption"])
    present_miss_rate: float | None = Field(
        description="deprecated alias of absorption (the measure it named is replaced); it goes "
        "in the next release"
    )
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
        description="what it writes along this latent's decoder direction on the absorbed "
        "positions: Σ f_j·(ŵ_i·W_dec[j])"
    )
    share: float = Field(
        description="weight as a share of all strong writes along the direction (the absorbers' "
        "shares add up to the absorption)"
    )
    count: int = Field(description="absorbed positions where it fires")
    cofiring: float = Field(
        description="share of this latent's firings where it fires too: near 0 for a substitute"
    )
    frequency: float = Field(description=DEFINITIONS["frequency"])
    top_tokens: list[TokenCount] = Field(description="the tokens it fires on most")


class EncoderDecoder(BaseModel):
    jaccard: float = Field(description=DEFINITIONS["jaccard"])
    jaccard_median: float = Field(
        description="the Jaccard overlap of a typical live latent of this SAE (the median)"
    )
    miss_rate: float = Field(description=DEFINITIONS["miss_rate"])
    miss_rate_median: float = Field(
        description="the miss rate of a typical live latent of this SAE (the median)"
    )
    absorption: float | None = Field(description=DEFINITIONS["absorption"])
    absorption_interval: list[float] | None = Field(
        description="[low, high]: 95% bootstrap interval of absorption over the sampled sequences"
    )
    absorption_reason: str | None = Field(description="why absorption is null, else null")
    present_miss_rate: float | None = Field(
        description="deprecated alias of absorption; it goes in the next release"
    )
    absorbed_positions: int = Field(
        description="sampled positions where the latent is off and other latents write its "
        "direction at least as strongly as it does at a typical firing"
    )
    decoder_auroc: float = Field(description=DEFINITIONS["decoder_auroc"])
    sample_positions: int = Field(description="size of the SAE's uniform position sample")
    absorbers: list[Absorber] = Field(
        description="the latents that write its direction where it is off, most first"
    )


class Histogram(BaseModel):
    edges: list[float]
    counts: list[int]


class Positional(BaseModel):
    firing_rate: list[float] = Field(description="per token position: share of tokens it fires on")
    mean_activation: list[float | None] = Field(
        description="per token position: mean activation where it fires; null where it never does"
    )


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
