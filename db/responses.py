"""The shapes of what the query layer returns: pydantic models, so the JSON API's field names are
these models' field names and OpenAPI documents them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

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
    "description_length_bits": "bits per token to send whether it fires and, where it does, its "
    "activation at the SAE's precision: H(p) + p·H(quantised activations)",
    "best_cosine": "decoder cosine with its closest live latent of the other SAE",
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


class TokenCount(BaseModel):
    token_id: int
    token: str
    count: int
    mean_activation: float


class LatentSummary(BaseModel):
    """A latent as lists of latents show it inline."""

    frequency: float
    top_tokens: list[TokenCount]


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
    description_length_bits: float = Field(description=DEFINITIONS["description_length_bits"])
    flags: list[str]
    top_tokens: list[TokenCount]


class FeaturePage(BaseModel):
    sae: str
    sort: str
    order: str
    items: list[FeatureRow]
    total: int = Field(description="features that match the filters, on every page")
    next_cursor: str | None = Field(description="pass as `after` for the next page")
    previous_cursor: str | None = Field(None, description="pass as `before` for the previous page")


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


class ClosestLatent(BaseModel):
    sae: str = Field(description="another SAE of the file with the same input width")
    feature_index: int
    cosine: float = Field(description=DEFINITIONS["best_cosine"])


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
    matches: list[ClosestLatent] = Field(
        description="its closest latent in each other SAE of the file with the same input width"
    )
    description_length_bits: float = Field(description=DEFINITIONS["description_length_bits"])
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


class PhraseLatent(BaseModel):
    feature_index: int
    activation: float = Field(description="its highest activation on the phrase's tokens")


class PhraseContext(BaseModel):
    sequence_index: int
    start: int = Field(description="position of the phrase's first token in the sequence")
    end: int = Field(description="position after its last token")
    tokens: list[str] = Field(description="the phrase's tokens with a window around them")
    token_ids: list[int]
    focus: int = Field(description="index of the phrase's first token within `tokens`")
    latents: list[PhraseLatent] = Field(description="strongest first")


class PhraseSearch(BaseModel):
    sae: str
    phrase: str
    sequences: int = Field(description="sequences of the corpus that contain the phrase")
    latents_source: Literal["computed", "stored"] = Field(
        description="computed: by the inference process on the corpus's tokens; stored: from "
        "the latents' stored examples"
    )
    latents_note: str = Field(description="what the listed latents are, in a sentence")
    contexts: list[PhraseContext] = Field(description="in corpus order")
    next_cursor: str | None = Field(description="`after` for the next page; null on the last")


class FlagGroup(BaseModel):
    name: str
    rule: str
    count: int
    features: list[int] = Field(description="up to `limit` feature indices, most extreme first")


class FlagsReport(BaseModel):
    sae: str
    threshold: float
    groups: list[FlagGroup]


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


class UnmatchedLatent(BaseModel):
    feature_index: int
    frequency: float = Field(description=DEFINITIONS["frequency"])
    closest: int = Field(description="its closest latent of the other SAE")
    cosine: float = Field(description=DEFINITIONS["best_cosine"])
    top_tokens: list[TokenCount]


class Comparison(PairSummary):
    histogram: Histogram = Field(description="of the best cosines of the live latents")
    threshold: float = Field(description="latents whose best cosine is below it are unmatched")
    unmatched_count: int
    sort: str
    order: str
    unmatched: list[UnmatchedLatent] = Field(description="live latents of `sae` with no match")
    next_cursor: str | None = Field(description="pass as `after` for the next page")


class SaeSideBySide(SaeSummary):
    training: Training | None
    threshold_ablation: list[AblationRule]


class SaeComparison(BaseModel):
    saes: list[SaeSideBySide]
    pairs: list[PairSummary] = Field(
        description="every comparison stored: each way between SAEs of the same input width"
    )


# Text run through the inference process (`saescope infer`), which the dashboard calls.
MAX_TEXT_TOKENS = 1024
"""longest text run, in tokens (BOS included)"""
MAX_TOP_LATENTS = 50
MAX_ASKED_LATENTS = 64


class ActivationRequest(BaseModel):
    text: str | None = Field(
        None, min_length=1, max_length=20 * MAX_TEXT_TOKENS, description="text to run"
    )
    token_ids: list[int] | None = Field(
        None,
        min_length=1,
        max_length=MAX_TEXT_TOKENS,
        description="instead of `text`: token ids to run as they are (no BOS is added)",
    )
    features: list[int] = Field(
        default_factory=list,
        max_length=MAX_ASKED_LATENTS,
        description="latents whose activation on every token to return",
    )
    top: int = Field(5, ge=0, le=MAX_TOP_LATENTS, description="latents listed per token")

    @model_validator(mode="after")
    def _one_input(self) -> ActivationRequest:
        if (self.text is None) == (self.token_ids is None):
            raise ValueError("give either `text` or `token_ids`")
        return self


class LatentActivation(BaseModel):
    feature_index: int
    activation: float


class FeatureActivations(BaseModel):
    feature_index: int
    activations: list[float] = Field(description="one per token")


class TextActivations(BaseModel):
    """The text's tokens (BOS first where the SAE's model prepends it) and the SAE's latents on
    them."""

    tokens: list[str]
    token_ids: list[int]
    special: list[bool]
    top: list[list[LatentActivation]] = Field(
        description="per token, the latents that fire most there, strongest first"
    )
    features: list[FeatureActivations] = Field(description="the latents asked for")
