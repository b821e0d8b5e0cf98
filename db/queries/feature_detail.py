"""One feature: its header metrics (`db.metrics`), flags, examples of every kind, the
encoder-versus-decoder measures with the latents that absorb it, histogram, positional profile,
logit effects, neighbours and matches in other SAEs."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, Field, create_model
from sqlalchemy import select
from sqlalchemy.orm import Session

from saescope.db import codec
from saescope.db.codec import HISTOGRAM_BINS_PER_DECADE, HISTOGRAM_LOG10_MIN
from saescope.db.metrics import BEST_COSINE, DEFINITIONS, HEADER_METRICS, response_fields
from saescope.db.models import Comparison, Feature, FeatureExamples, Match, Sae
from saescope.db.queries.examples import (
    EXAMPLE_KINDS,
    ExampleOut,
    ExampleRenderer,
    StoredExample,
    stored_examples,
)
from saescope.db.queries.feature_table import latent_summaries
from saescope.db.queries.flags import Flag, flag_reasons
from saescope.db.queries.lookups import NotFoundError, TokenCount, sae_row, token_counts, vocab

# Tokens shown beside each absorber.
ABSORBER_TOKENS = 3


class QuantileBand(BaseModel):
    band: int = Field(description="0 for the weakest band, as the page numbers them")
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
    specific_tokens: list[TokenCount] = Field(description="the tokens it is most specific to")


class EncoderDecoder(BaseModel):
    jaccard: float | None = Field(description=DEFINITIONS["jaccard"])
    jaccard_median: float = Field(
        description="the Jaccard overlap of a typical live latent of this SAE (the median)"
    )
    miss_rate: float | None = Field(description=DEFINITIONS["miss_rate"])
    miss_rate_median: float = Field(
        description="the miss rate of a typical live latent of this SAE (the median)"
    )
    absorption: float | None = Field(description=DEFINITIONS["absorption"])
    absorption_interval: list[float] | None = Field(
        description="[low, high]: 95% bootstrap interval of absorption over the sampled sequences"
    )
    absorption_reason: str | None = Field(description="why absorption is null, else null")
    absorbed_positions: int = Field(description=DEFINITIONS["absorbed_positions"])
    decoder_auroc: float | None = Field(description=DEFINITIONS["decoder_auroc"])
    sample_positions: int = Field(description="size of the SAE's uniform position sample")
    absorbers: list[Absorber] = Field(
        description="the latents that write its direction where it is off, most first"
    )


class Histogram(BaseModel):
    edges: list[float]
    counts: list[int]


# Firings a bin of the positional profile holds on average, at least (unless one bin is all).
POSITIONAL_BIN_FIRINGS = 20


class Positional(BaseModel):
    firing_rate: list[float] = Field(description="per token position: share of tokens it fires on")
    mean_activation: list[float | None] = Field(
        description="per token position: mean activation where it fires; null where it never does"
    )
    bin_width: int = Field(
        description="positions per bin of `firings`: 1, or more where firings are sparse (the "
        f"smallest power of two that puts at least {POSITIONAL_BIN_FIRINGS} firings in a bin on "
        "average)"
    )
    firings: list[int] = Field(description="per bin of positions, from position 0: its firings")
    bin_mean_activation: list[float | None] = Field(
        description="per bin: mean activation where it fires; null where it never does"
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
    cosine: float = Field(description=BEST_COSINE)
    chance_max_cosine: float = Field(
        description="the highest best cosine random decoders of the two SAEs' shapes give"
    )
    match: bool = Field(description="a match: its cosine is above chance_max_cosine")


class GroundTruth(BaseModel):
    """Synthetic data only: the true feature closest to this latent's decoder direction, and
    the closest normalised sum of two true features."""

    feature: str
    cosine: float
    composed: bool = Field(description="closer to the sum of two true features than to any one")
    composed_of: list[str]
    composed_cosine: float


FeatureDetail = create_model(
    "FeatureDetail",
    sae=(str, ...),
    feature_index=(int, ...),
    d_sae=(int, ...),
    **response_fields(HEADER_METRICS),
    flags=(list[Flag], ...),
    examples=(Examples, ...),
    encoder_decoder=(EncoderDecoder, ...),
    histogram=(Histogram, ...),
    positional=(Positional, ...),
    logits_top=(list[LogitEffect], ...),
    logits_bottom=(list[LogitEffect], ...),
    neighbours=(list[Neighbour], ...),
    matches=(
        list[ClosestLatent],
        Field(
            description="its closest latent in each other SAE of the file with the same input width"
        ),
    ),
    specific_tokens=(
        list[TokenCount],
        Field(description="the tokens it is most specific to (see `specificity`)"),
    ),
    top_tokens=(list[TokenCount], Field(description="the tokens it fires on most often")),
    min_token_firings=(
        int,
        Field(description="firings on a token before its specificity to it ranks the token"),
    ),
    ground_truth=(GroundTruth | None, ...),
)


def feature_row(session: Session, sae: Sae, feature_index: int) -> Feature:
    feature = session.get(Feature, (sae.id, feature_index)) if feature_index < sae.d_sae else None
    if feature is None:
        raise NotFoundError(
            f"SAE {sae.name!r} has no feature {feature_index} (it has 0..{sae.d_sae - 1})"
        )
    return feature


def get_feature(session: Session, sae_name: str, feature_index: int) -> FeatureDetail:
    sae = sae_row(session, sae_name)
    feature = feature_row(session, sae, feature_index)
    strings = vocab(session, sae.corpus_id)
    grouped: dict[str, list[StoredExample]] = {kind: [] for kind in EXAMPLE_KINDS}
    for row in session.execute(
        select(FeatureExamples.__table__).where(
            FeatureExamples.sae_id == sae.id, FeatureExamples.feature_index == feature_index
        )
    ):
        grouped[row.kind] = stored_examples(row)
    renderer = ExampleRenderer(session, sae, strings)
    renderer.load([example for examples in grouped.values() for example in examples])
    edges = feature.quantile_edges
    bands = [
        QuantileBand(
            band=band,
            lower=edges[band],
            upper=edges[band + 1],
            mass_share=feature.quantile_mass[band],
            examples=[renderer.render(e) for e in grouped["quantile"] if e.band == band],
        )
        for band in range(len(edges) - 1)
    ]
    return FeatureDetail(
        sae=sae.name,
        feature_index=feature_index,
        d_sae=sae.d_sae,
        **{metric.name: getattr(feature, metric.name) for metric in HEADER_METRICS},
        flags=flag_reasons(feature, sae.high_frequency_threshold),
        examples=Examples(
            top=[renderer.render(e) for e in grouped["top"]],
            bottom=[renderer.render(e) for e in grouped["bottom"]],
            quantiles=bands,
            decoder_top=[renderer.render(e) for e in grouped["decoder_top"]],
        ),
        encoder_decoder=EncoderDecoder(
            jaccard=feature.jaccard,
            jaccard_median=sae.jaccard_median,
            miss_rate=feature.miss_rate,
            miss_rate_median=sae.miss_rate_median,
            absorption=feature.absorption,
            absorption_interval=None
            if feature.absorption is None
            else [feature.absorption_low, feature.absorption_high],
            absorption_reason=feature.absorption_reason,
            absorbed_positions=feature.absorbed_positions,
            decoder_auroc=feature.decoder_auroc,
            sample_positions=sae.sample_positions,
            absorbers=_absorbers(session, sae, feature.absorbers),
        ),
        histogram=_histogram(feature),
        positional=_positional(sae, feature),
        logits_top=[LogitEffect(token=strings[x["token_id"]], **x) for x in feature.logits_top],
        logits_bottom=[
            LogitEffect(token=strings[x["token_id"]], **x) for x in feature.logits_bottom
        ],
        neighbours=[Neighbour(**n) for n in feature.neighbours],
        matches=_closest_latents(session, sae, feature_index),
        specific_tokens=token_counts(feature.specific_tokens, strings),
        top_tokens=token_counts(feature.top_tokens, strings),
        min_token_firings=sae.config["min_token_firings"],
        ground_truth=None
        if feature.gt_feature is None
        else GroundTruth(
            feature=feature.gt_feature,
            cosine=feature.gt_cosine,
            composed=feature.composed_cosine > feature.gt_cosine,
            composed_of=feature.composed_of,
            composed_cosine=feature.composed_cosine,
        ),
    )


def _closest_latents(session: Session, sae: Sae, feature_index: int) -> list[ClosestLatent]:
    """The latent's closest latent in each SAE it has been compared with, in file order."""
    rows = session.execute(
        select(Sae.name, Match.other_feature_index, Match.cosine, Comparison.chance_max_cosine)
        .join(Sae, Sae.id == Match.other_sae_id)
        .join(
            Comparison,
            (Comparison.sae_id == Match.sae_id) & (Comparison.other_sae_id == Match.other_sae_id),
        )
        .where(Match.sae_id == sae.id, Match.feature_index == feature_index)
        .order_by(Match.other_sae_id)
    )
    return [
        ClosestLatent(
            sae=name,
            feature_index=index,
            cosine=cosine,
            chance_max_cosine=chance,
            match=cosine > chance,
        )
        for name, index, cosine, chance in rows
    ]


def _absorbers(session: Session, sae: Sae, stored: list[dict]) -> list[Absorber]:
    """The stored absorbers, each with its frequency and specific tokens (one query for all)."""
    found = latent_summaries(
        session, sae, [absorber["feature_index"] for absorber in stored], ABSORBER_TOKENS
    )
    return [Absorber(**absorber, **dict(found[absorber["feature_index"]])) for absorber in stored]


def _positional(sae: Sae, feature: Feature) -> Positional:
    """Firing rate and mean activation per position (no mean where it never fires), and the
    firings per bin of positions, binned as wide as sparse firings need."""
    columns = Feature.__table__.c
    rate = codec.unpack(columns.position_rate, feature.position_rate).astype(np.float64)
    mean = codec.unpack(columns.position_mean, feature.position_mean).astype(np.float64)
    tokens = codec.unpack(Sae.__table__.c.position_tokens, sae.position_tokens)
    firings = np.rint(rate * tokens)
    width = 1
    while (
        width < len(firings) and firings.sum() / -(-len(firings) // width) < POSITIONAL_BIN_FIRINGS
    ):
        width *= 2
    bins = np.arange(len(firings)) // width
    binned = np.bincount(bins, weights=firings)
    mass = np.bincount(bins, weights=firings * mean)
    return Positional(
        firing_rate=np.round(rate, 6).tolist(),
        mean_activation=[
            round(value, 6) if fired else None
            for value, fired in zip(mean.tolist(), (rate > 0).tolist(), strict=True)
        ],
        bin_width=width,
        firings=binned.astype(np.int64).tolist(),
        bin_mean_activation=[
            round(total / count, 6) if count else None
            for total, count in zip(mass.tolist(), binned.tolist(), strict=True)
        ],
    )


def _histogram(feature: Feature) -> Histogram:
    """The stored fine histogram, merged 8:1 into bins of an eighth of a decade for display."""
    counts = codec.unpack(Feature.__table__.c.histogram_counts, feature.histogram_counts)
    if len(counts) == 0:
        return Histogram(edges=[], counts=[])
    merge = 8
    first = feature.histogram_first_bin
    start = (first - 1) // merge * merge + 1 if first > 0 else 0
    padded = np.zeros(first - start + len(counts) + merge, dtype=np.int64)
    padded[first - start : first - start + len(counts)] = counts
    coarse = padded[: len(padded) // merge * merge].reshape(-1, merge).sum(1)
    coarse = np.trim_zeros(coarse, "b")
    log_edges = HISTOGRAM_LOG10_MIN + (start - 1 + np.arange(len(coarse) + 1) * merge) / (
        HISTOGRAM_BINS_PER_DECADE
    )
    edges = np.clip(10.0**log_edges, feature.min_activation, feature.max_activation)
    return Histogram(edges=edges.tolist(), counts=coarse.tolist())
