"""The one query layer: every HTML page and its JSON twin are served from these functions.

Results are pydantic models, so the JSON API's field names are the models' field names.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from pydantic import BaseModel, Field
from sqlalchemy import Row, and_, func, or_, select
from sqlalchemy.orm import Session

from saescope.db.models import (
    HISTOGRAM_BINS_PER_DECADE,
    HISTOGRAM_LOG10_MIN,
    WINDOW_LEFT,
    WINDOW_LENGTH,
    CorpusSequence,
    Example,
    Feature,
    Sae,
    TokenLatent,
    TokenStat,
    VocabToken,
)

MAX_PAGE_SIZE = 200
EXAMPLE_KINDS = ("top", "bottom", "quantile", "decoder_top")


class NotFoundError(Exception):
    """An SAE, feature or token that the database does not hold."""


class BadRequestError(Exception):
    """Parameters that are each well-formed but do not make sense together."""


# ---------------------------------------------------------------------------------------------
# Response models


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


# ---------------------------------------------------------------------------------------------
# Helpers


class SortKey(StrEnum):
    feature_index = "feature_index"
    frequency = "frequency"
    max_activation = "max_activation"
    jaccard = "jaccard"
    miss_rate = "miss_rate"
    present_miss_rate = "present_miss_rate"


class SortOrder(StrEnum):
    asc = "asc"
    desc = "desc"


class FlagName(StrEnum):
    dead = "dead"
    high_frequency = "high_frequency"
    positional = "positional"
    bos_dominated = "bos_dominated"
    absorbed = "absorbed"


FLAG_RULES = {
    "dead": "never active on the corpus tokens",
    "high_frequency": "fires on more than {threshold:.0%} of tokens",
    "positional": "position explains more than half of the activation variance (R² > 0.5)",
    "bos_dominated": "more than half of its firings are on BOS/special tokens",
    "absorbed": "off on at least 40% of the sampled positions where its decoder direction is "
    "present, and one other latent writes at least half of that direction there",
}


def flags_of(feature: Feature) -> list[str]:
    return [name.value for name in FlagName if getattr(feature, name.value)]


def flag_reasons(feature: Feature, threshold: float) -> list[Flag]:
    reasons = {
        "dead": "never fired on the corpus tokens",
        "high_frequency": f"fires on {feature.frequency:.1%} of tokens (threshold {threshold:.0%})",
        "positional": f"position explains {feature.positional_r2:.0%} of its activation variance",
        "bos_dominated": f"{feature.bos_share:.0%} of its firings are on BOS/special tokens",
        "absorbed": f"off on {feature.present_miss_rate or 0:.0%} of the sampled positions where "
        "its decoder direction is present; the latents listed under encoder vs decoder fire there",
    }
    return [Flag(name=name, reason=reasons[name]) for name in flags_of(feature)]


def _sae(session: Session, name: str) -> Sae:
    sae = session.scalar(select(Sae).where(Sae.name == name))
    if sae is None:
        raise NotFoundError(f"no SAE named {name!r}")
    return sae


_VOCAB_CACHE: dict[tuple[str, int], list[str]] = {}


def _vocab(session: Session, corpus_id: int) -> list[str]:
    """The token strings of a corpus, read once per database file (read-only, so never stale).
    Read through the caller's session: a second connection per request could exhaust the pool."""
    key = (str(session.get_bind().url), corpus_id)
    if key not in _VOCAB_CACHE:
        rows = session.execute(
            select(VocabToken.token)
            .where(VocabToken.corpus_id == corpus_id)
            .order_by(VocabToken.token_id)
        )
        _VOCAB_CACHE[key] = list(rows.scalars())
    return _VOCAB_CACHE[key]


def _token_counts(items: list[dict], vocab: list[str]) -> list[TokenCount]:
    return [TokenCount(token=vocab[item["token_id"]], **item) for item in items]


@dataclass
class _StoredExample:
    sequence_index: int
    position: int
    activation: float
    projection: float | None
    band: int | None
    window: np.ndarray  # float32 [WINDOW_LENGTH], NaN outside the sequence


def _stored_examples(row: Row) -> list[_StoredExample]:
    """The examples packed in one row of the `examples` table, in stored order."""

    def array(blob: bytes | None, dtype: str) -> list | None:
        return None if blob is None else np.frombuffer(blob, dtype=dtype).tolist()

    sequence = array(row.sequence_index, "<i4")
    projection = array(row.projection, "<f4") or [None] * len(sequence)
    band = array(row.band, "<i4") or [None] * len(sequence)
    windows = np.frombuffer(row.window_activations, dtype="<f4").reshape(-1, WINDOW_LENGTH)
    return [
        _StoredExample(*fields)
        for fields in zip(
            sequence,
            array(row.position, "<i4"),
            array(row.activation, "<f4"),
            projection,
            band,
            windows,
            strict=True,
        )
    ]


class _ExampleRenderer:
    """Turns stored examples into windows of token strings, loading each sequence once."""

    def __init__(self, session: Session, sae: Sae, vocab: list[str]) -> None:
        self.session = session
        self.corpus_id = sae.corpus_id
        self.vocab = vocab
        self.sequences: dict[int, np.ndarray] = {}

    def load(self, examples: list[_StoredExample]) -> None:
        wanted = {example.sequence_index for example in examples} - self.sequences.keys()
        if not wanted:
            return
        found = self.session.execute(
            select(CorpusSequence.sequence_index, CorpusSequence.token_ids).where(
                CorpusSequence.corpus_id == self.corpus_id,
                CorpusSequence.sequence_index.in_(wanted),
            )
        )
        for index, blob in found:
            self.sequences[index] = np.frombuffer(blob, dtype="<i4")

    def render(self, example: _StoredExample) -> ExampleOut:
        inside = np.flatnonzero(~np.isnan(example.window))
        start = example.position - WINDOW_LEFT + int(inside[0])
        activations = example.window[inside]
        token_ids = self.sequences[example.sequence_index][
            start : start + len(activations)
        ].tolist()
        # Trusted data straight from the file: construct without re-validating every field.
        return ExampleOut.model_construct(
            sequence_index=example.sequence_index,
            position=example.position,
            activation=example.activation,
            projection=example.projection,
            tokens=[self.vocab[t] for t in token_ids],
            token_ids=token_ids,
            activations=np.round(activations.astype(np.float64), 5).tolist(),
            focus=example.position - start,
        )


# ---------------------------------------------------------------------------------------------
# Queries


def list_saes(session: Session) -> list[SaeSummary]:
    saes = session.scalars(select(Sae).order_by(Sae.id))
    return [SaeSummary.model_validate(sae, from_attributes=True) for sae in saes]


def get_sae(session: Session, name: str) -> SaeDetail:
    return SaeDetail.model_validate(_sae(session, name), from_attributes=True)


def list_features(
    session: Session,
    sae_name: str,
    sort: SortKey = SortKey.feature_index,
    order: SortOrder = SortOrder.asc,
    flag: FlagName | None = None,
    min_frequency: float | None = None,
    max_frequency: float | None = None,
    after: str | None = None,
    limit: int = 50,
) -> FeaturePage:
    """One page of the feature table, paginated by key: `after` is the previous page's cursor."""
    if min_frequency is not None and max_frequency is not None and min_frequency > max_frequency:
        raise BadRequestError("min_frequency is greater than max_frequency")
    sae = _sae(session, sae_name)
    column = _sort_column(sort)
    query = select(Feature).where(Feature.sae_id == sae.id)
    if flag is not None:
        query = query.where(getattr(Feature, flag.value).is_(True))
    if min_frequency is not None:
        query = query.where(Feature.frequency >= min_frequency)
    if max_frequency is not None:
        query = query.where(Feature.frequency <= max_frequency)
    if after is not None:
        value, index = _parse_cursor(after, sort)
        beyond = column > value if order is SortOrder.asc else column < value
        query = query.where(or_(beyond, and_(column == value, Feature.feature_index > index)))
    direction = column.asc() if order is SortOrder.asc else column.desc()
    features = list(
        session.scalars(query.order_by(direction, Feature.feature_index).limit(limit + 1))
    )
    vocab = _vocab(session, sae.corpus_id)
    items = [
        FeatureRow(
            feature_index=f.feature_index,
            frequency=f.frequency,
            mean_activation=f.mean_activation,
            max_activation=f.max_activation,
            jaccard=f.jaccard,
            miss_rate=f.miss_rate,
            present_miss_rate=f.present_miss_rate,
            flags=flags_of(f),
            top_tokens=_token_counts(f.top_tokens[:5], vocab),
        )
        for f in features[:limit]
    ]
    next_cursor = None
    if len(features) > limit:
        last = features[limit - 1]
        next_cursor = f"{_sort_value(last, sort)!r}:{last.feature_index}"
    return FeaturePage(
        sae=sae.name, sort=sort.value, order=order.value, items=items, next_cursor=next_cursor
    )


# Features too rare to measure absorption on sort as if their present miss rate were -1.
_UNMEASURED = -1.0


def _sort_column(sort: SortKey):
    column = getattr(Feature, sort.value)
    if sort is SortKey.present_miss_rate:
        return func.coalesce(column, _UNMEASURED)
    return column


def _sort_value(feature: Feature, sort: SortKey) -> float | int:
    value = getattr(feature, sort.value)
    return _UNMEASURED if value is None else value


def _parse_cursor(cursor: str, sort: SortKey) -> tuple[float, int]:
    value, _, index = cursor.rpartition(":")
    try:
        return (int(value) if sort is SortKey.feature_index else float(value)), int(index)
    except ValueError:
        raise BadRequestError(
            f"cursor {cursor!r} does not belong to a table sorted by {sort.value}"
        ) from None


def get_feature(session: Session, sae_name: str, feature_index: int) -> FeatureDetail:
    sae = _sae(session, sae_name)
    feature = session.get(Feature, (sae.id, feature_index))
    if feature is None:
        raise NotFoundError(
            f"SAE {sae.name!r} has no feature {feature_index} (it has 0..{sae.d_sae - 1})"
        )
    vocab = _vocab(session, sae.corpus_id)
    grouped: dict[str, list[_StoredExample]] = {kind: [] for kind in EXAMPLE_KINDS}
    for row in session.execute(
        select(Example.__table__).where(
            Example.sae_id == sae.id, Example.feature_index == feature_index
        )
    ):
        grouped[row.kind] = _stored_examples(row)
    renderer = _ExampleRenderer(session, sae, vocab)
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
        count=feature.count,
        frequency=feature.frequency,
        mean_activation=feature.mean_activation,
        max_activation=feature.max_activation,
        bos_share=feature.bos_share,
        positional_r2=feature.positional_r2,
        flags=flag_reasons(feature, sae.high_frequency_threshold),
        examples=Examples(
            top=[renderer.render(e) for e in grouped["top"]],
            bottom=[renderer.render(e) for e in grouped["bottom"]],
            quantiles=bands,
            decoder_top=[renderer.render(e) for e in grouped["decoder_top"]],
        ),
        encoder_decoder=EncoderDecoder(
            jaccard=feature.jaccard,
            miss_rate=feature.miss_rate,
            present_miss_rate=feature.present_miss_rate,
            present_positions=feature.present_positions,
            sample_positions=sae.sample_positions,
            absorbers=[Absorber(**a) for a in feature.absorbers],
        ),
        histogram=_histogram(feature),
        positional=Positional(
            firing_rate=_floats(feature.position_rate),
            mean_activation=_floats(feature.position_mean),
        ),
        logits_top=[LogitEffect(token=vocab[x["token_id"]], **x) for x in feature.logits_top],
        logits_bottom=[LogitEffect(token=vocab[x["token_id"]], **x) for x in feature.logits_bottom],
        neighbours=[Neighbour(**n) for n in feature.neighbours],
        top_tokens=_token_counts(feature.top_tokens, vocab),
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


def _floats(blob: bytes) -> list[float]:
    return np.round(np.frombuffer(blob, dtype="<f4").astype(np.float64), 6).tolist()


def _histogram(feature: Feature) -> Histogram:
    """The stored fine histogram, merged 8:1 into bins of an eighth of a decade for display."""
    counts = np.frombuffer(feature.histogram_counts, dtype="<i4")
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


def search_tokens(
    session: Session, sae_name: str, query: str, limit: int = 10, latents_per_token: int = 5
) -> TokenSearch:
    """Tokens equal to the query (ignoring surrounding spaces) first, then tokens containing it;
    for each, the latents most associated with it and a couple of contexts where they fire."""
    sae = _sae(session, sae_name)
    vocab = _vocab(session, sae.corpus_id)
    needle = query.strip()
    if not needle:
        return TokenSearch(sae=sae.name, query=query, matches=[])
    counts = {
        token_id: count
        for token_id, count in session.execute(
            select(TokenStat.token_id, TokenStat.count).where(TokenStat.sae_id == sae.id)
        )
    }
    exact = [t for t, s in enumerate(vocab) if s == query or s.strip() == needle]
    exact_set = set(exact)
    substring = [t for t, s in enumerate(vocab) if needle in s and t not in exact_set]
    ranked = sorted(exact, key=lambda t: -counts.get(t, 0)) + sorted(
        (t for t in substring if counts.get(t, 0) > 0), key=lambda t: -counts[t]
    )
    matches = []
    renderer = _ExampleRenderer(session, sae, vocab)
    for token_id in ranked[:limit]:
        latents = list(
            session.scalars(
                select(TokenLatent)
                .where(TokenLatent.sae_id == sae.id, TokenLatent.token_id == token_id)
                .order_by(TokenLatent.rank)
                .limit(latents_per_token)
            )
        )
        matches.append(
            TokenMatch(
                token_id=token_id,
                token=vocab[token_id],
                exact=token_id in exact_set,
                count=counts.get(token_id, 0),
                latents=[_latent_for_token(session, sae, latent, renderer) for latent in latents],
            )
        )
    return TokenSearch(sae=sae.name, query=query, matches=matches)


def _latent_for_token(
    session: Session, sae: Sae, latent: TokenLatent, renderer: _ExampleRenderer
) -> LatentForToken:
    """The latent with up to two of its stored examples whose focus token is this token."""
    rows = session.execute(
        select(Example.__table__)
        .where(Example.sae_id == sae.id, Example.feature_index == latent.feature_index)
        .where(Example.kind.in_(("top", "quantile")))
    )
    stored = sorted(
        (example for row in rows for example in _stored_examples(row)),
        key=lambda example: -example.activation,
    )
    renderer.load(stored)
    examples = [
        renderer.render(example)
        for example in stored
        if renderer.sequences[example.sequence_index][example.position] == latent.token_id
    ][:2]
    return LatentForToken(
        feature_index=latent.feature_index,
        count=latent.count,
        mean_activation=latent.mean_activation,
        examples=examples,
    )


def flags_report(
    session: Session, sae_name: str, threshold: float, limit: int = 100
) -> FlagsReport:
    """Counts and members of each flag group; high frequency uses `threshold`, not the build's."""
    sae = _sae(session, sae_name)
    conditions = {
        "high_frequency": (Feature.frequency > threshold, Feature.frequency.desc()),
        "dead": (Feature.dead.is_(True), Feature.feature_index.asc()),
        "positional": (Feature.positional.is_(True), Feature.positional_r2.desc()),
        "bos_dominated": (Feature.bos_dominated.is_(True), Feature.bos_share.desc()),
        "absorbed": (Feature.absorbed.is_(True), Feature.present_miss_rate.desc()),
    }
    groups = []
    for name, (condition, ordering) in conditions.items():
        base = select(Feature.feature_index).where(Feature.sae_id == sae.id, condition)
        count = session.scalar(select(func.count()).select_from(base.subquery()))
        members = session.scalars(base.order_by(ordering, Feature.feature_index).limit(limit))
        groups.append(
            FlagGroup(
                name=name,
                rule=FLAG_RULES[name].format(threshold=threshold),
                count=count,
                features=list(members),
            )
        )
    return FlagsReport(sae=sae.name, threshold=threshold, groups=groups)
