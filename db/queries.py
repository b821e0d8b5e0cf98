"""The one query layer: every HTML page and its JSON twin are served from these functions, which
return the models of `db.responses`."""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from sqlalchemy import Engine, Row, and_, func, or_, select
from sqlalchemy.orm import Session

from saescope.db import codec, corpus_text
from saescope.db.codec import (
    HISTOGRAM_BINS_PER_DECADE,
    HISTOGRAM_LOG10_MIN,
    WINDOW_LEFT,
    WINDOW_RIGHT,
    cosine_edges,
)
from saescope.db.flags import COMPARISONS, FLAGS, FLAGS_BY_NAME, FlagDefinition, FlagName
from saescope.db.models import Comparison as StoredComparison
from saescope.db.models import (
    CorpusSequence,
    Feature,
    FeatureExamples,
    Match,
    Sae,
    SequenceExamples,
    TokenLatent,
    TokenStat,
    VocabToken,
)
from saescope.db.responses import (
    Absorber,
    ClosestLatent,
    Comparison,
    EncoderDecoder,
    ExampleOut,
    Examples,
    FeatureDetail,
    FeaturePage,
    FeatureRow,
    Flag,
    FlagGroup,
    FlagsReport,
    GroundTruth,
    Histogram,
    LatentForToken,
    LatentSummary,
    LogitEffect,
    Neighbour,
    PairSummary,
    PhraseContext,
    PhraseLatent,
    PhraseSearch,
    Positional,
    QuantileBand,
    SaeComparison,
    SaeDetail,
    SaeSideBySide,
    SaeSummary,
    ThresholdAblation,
    TokenCount,
    TokenMatch,
    TokenSearch,
    UnmatchedLatent,
)

MAX_PAGE_SIZE = 200
EXAMPLE_KINDS = ("top", "bottom", "quantile", "decoder_top")
# Tokens shown beside each absorber.
ABSORBER_TOKENS = 3
# Token search shows contexts from these kinds of a latent's examples.
SEARCHED_KINDS = ("top", "quantile")


class NotFoundError(Exception):
    """An SAE, feature or token that the database does not hold."""


class BadRequestError(Exception):
    """Parameters that are each well-formed but do not make sense together."""


class SortKey(StrEnum):
    feature_index = "feature_index"
    frequency = "frequency"
    max_activation = "max_activation"
    jaccard = "jaccard"
    miss_rate = "miss_rate"
    absorption = "absorption"
    present_miss_rate = "present_miss_rate"  # deprecated alias of absorption
    description_length_bits = "description_length_bits"


class UnmatchedSort(StrEnum):
    frequency = "frequency"
    cosine = "cosine"
    feature_index = "feature_index"


class SortOrder(StrEnum):
    asc = "asc"
    desc = "desc"


# ---------------------------------------------------------------------------------------------
# Helpers


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


def _sae(session: Session, name: str) -> Sae:
    sae = session.scalar(select(Sae).where(Sae.name == name))
    if sae is None:
        raise NotFoundError(f"no SAE named {name!r}")
    return sae


# Per engine (one file, read-only, so never stale) and corpus: gone with the engine.
_VOCAB_CACHE: weakref.WeakKeyDictionary[Engine, dict[int, list[str]]] = weakref.WeakKeyDictionary()


def _vocab(session: Session, corpus_id: int) -> list[str]:
    """The token strings of a corpus, read once per engine. Read through the caller's session:
    a second connection per request could exhaust the pool."""
    cached = _VOCAB_CACHE.setdefault(session.get_bind(), {})
    if corpus_id not in cached:
        rows = session.execute(
            select(VocabToken.token)
            .where(VocabToken.corpus_id == corpus_id)
            .order_by(VocabToken.token_id)
        )
        cached[corpus_id] = list(rows.scalars())
    return cached[corpus_id]


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
    columns = FeatureExamples.__table__.c

    def values(name: str) -> list | None:
        unpacked = codec.unpack(columns[name], getattr(row, name))
        return None if unpacked is None else unpacked.tolist()

    sequence = values("sequence_index")
    missing = [None] * len(sequence)
    return [
        _StoredExample(*fields)
        for fields in zip(
            sequence,
            values("position"),
            values("activation"),
            values("projection") or missing,
            values("band") or missing,
            codec.unpack(columns.window_activations, row.window_activations),
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
        self.sequences |= _sequence_tokens(self.session, self.corpus_id, wanted)

    def token_at(self, example: _StoredExample) -> int:
        return int(self.sequences[example.sequence_index][example.position])

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
    before: str | None = None,
) -> FeaturePage:
    """One page of the feature table, paginated by key: the rows after the cursor `after` (a
    page's `next_cursor`) or before the cursor `before` (its `previous_cursor`); with the count
    of rows that match the filters."""
    if min_frequency is not None and max_frequency is not None and min_frequency > max_frequency:
        raise BadRequestError("min_frequency is greater than max_frequency")
    if after is not None and before is not None:
        raise BadRequestError("give after or before, not both")
    sae = _sae(session, sae_name)
    threshold = sae.high_frequency_threshold
    column = _sort_column(sort)
    query = select(Feature).where(Feature.sae_id == sae.id)
    if flag is not None:
        query = query.where(flag_clause(FLAGS_BY_NAME[flag.value], threshold))
    if min_frequency is not None:
        query = query.where(Feature.frequency >= min_frequency)
    if max_frequency is not None:
        query = query.where(Feature.frequency <= max_frequency)
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    backward = before is not None
    query = _keyset(query, column, Feature.feature_index, order, before or after, sort, backward)
    features = list(session.scalars(query.limit(limit + 1)))
    more = len(features) > limit
    features = features[:limit]
    if backward:
        features.reverse()
    vocab = _vocab(session, sae.corpus_id)
    items = [
        FeatureRow(
            feature_index=f.feature_index,
            frequency=f.frequency,
            mean_activation=f.mean_activation,
            max_activation=f.max_activation,
            jaccard=f.jaccard,
            miss_rate=f.miss_rate,
            absorption=f.absorption,
            present_miss_rate=f.absorption,
            description_length_bits=f.description_length_bits,
            flags=flags_of(f, threshold),
            top_tokens=_token_counts(f.top_tokens[:5], vocab),
        )
        for f in features
    ]
    # Going forward there are rows before this page if it started after one; going backward,
    # rows after it (the one it started before).
    has_next, has_previous = (True, more) if backward else (more, after is not None)
    return FeaturePage(
        sae=sae.name,
        sort=sort.value,
        order=order.value,
        items=items,
        total=total,
        next_cursor=_cursor(_sort_value(features[-1], sort), features[-1].feature_index)
        if has_next and features
        else None,
        previous_cursor=_cursor(_sort_value(features[0], sort), features[0].feature_index)
        if has_previous and features
        else None,
    )


# Latents whose absorption cannot be measured sort as if it were -1: last, or first ascending.
_UNMEASURED = -1.0
# Sort keys that name another column.
SORT_ALIASES = {SortKey.present_miss_rate: SortKey.absorption}


def _sort_column(sort: SortKey):
    sort = SORT_ALIASES.get(sort, sort)
    column = getattr(Feature, sort.value)
    if sort is SortKey.absorption:
        return func.coalesce(column, _UNMEASURED)
    return column


def _sort_value(feature: Feature, sort: SortKey) -> float | int:
    value = getattr(feature, SORT_ALIASES.get(sort, sort).value)
    return _UNMEASURED if value is None else value


# Stored integers are SQLite's 64-bit ones.
INTEGER_LIMIT = 2**63


def _keyset(
    query,
    column,
    index,
    order: SortOrder,
    cursor: str | None,
    sort: StrEnum,
    backward: bool = False,
):
    """`query` ordered by `column` then `index` (unique), from after the cursor; `backward`:
    from before it, in reverse order (the caller reverses the page)."""
    ascending = (order is SortOrder.asc) != backward
    if cursor is not None:
        value, last = _parse_cursor(cursor, sort)
        beyond = column > value if ascending else column < value
        next_index = index < last if backward else index > last
        query = query.where(or_(beyond, and_(column == value, next_index)))
    direction = column.asc() if ascending else column.desc()
    return query.order_by(direction, index.desc() if backward else index.asc())


def _cursor(value: float | int, index: int) -> str:
    """The `next_cursor` after a row: its sort value and its (unique) index."""
    return f"{value!r}:{index}"


def _parse_cursor(cursor: str, sort: StrEnum) -> tuple[float, int]:
    """(sort value, index) of a `next_cursor`; BadRequestError for anything else, values out of
    range and not finite included."""
    value, _, index = cursor.rpartition(":")
    try:
        parsed = (int(value) if sort.value == "feature_index" else float(value)), int(index)
    except ValueError:
        parsed = None
    if (
        parsed is None
        or not math.isfinite(parsed[0])
        or not -INTEGER_LIMIT < parsed[0] < INTEGER_LIMIT
        or not 0 <= parsed[1] < INTEGER_LIMIT
    ):
        raise BadRequestError(
            f"cursor {cursor!r} does not belong to a table sorted by {sort.value}"
        )
    return parsed


def get_feature(session: Session, sae_name: str, feature_index: int) -> FeatureDetail:
    sae = _sae(session, sae_name)
    feature = session.get(Feature, (sae.id, feature_index)) if feature_index < sae.d_sae else None
    if feature is None:
        raise NotFoundError(
            f"SAE {sae.name!r} has no feature {feature_index} (it has 0..{sae.d_sae - 1})"
        )
    vocab = _vocab(session, sae.corpus_id)
    grouped: dict[str, list[_StoredExample]] = {kind: [] for kind in EXAMPLE_KINDS}
    for row in session.execute(
        select(FeatureExamples.__table__).where(
            FeatureExamples.sae_id == sae.id, FeatureExamples.feature_index == feature_index
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
            jaccard_median=sae.jaccard_median,
            miss_rate=feature.miss_rate,
            miss_rate_median=sae.miss_rate_median,
            absorption=feature.absorption,
            absorption_interval=None
            if feature.absorption is None
            else [feature.absorption_low, feature.absorption_high],
            absorption_reason=feature.absorption_reason,
            present_miss_rate=feature.absorption,
            absorbed_positions=feature.absorbed_positions,
            decoder_auroc=feature.decoder_auroc,
            sample_positions=sae.sample_positions,
            absorbers=_absorbers(session, sae, feature.absorbers, vocab),
        ),
        histogram=_histogram(feature),
        positional=_positional(feature),
        logits_top=[LogitEffect(token=vocab[x["token_id"]], **x) for x in feature.logits_top],
        logits_bottom=[LogitEffect(token=vocab[x["token_id"]], **x) for x in feature.logits_bottom],
        neighbours=[Neighbour(**n) for n in feature.neighbours],
        matches=_closest_latents(session, sae, feature_index),
        description_length_bits=feature.description_length_bits,
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


def _closest_latents(session: Session, sae: Sae, feature_index: int) -> list[ClosestLatent]:
    """The latent's closest latent in each SAE it has been compared with, in file order."""
    rows = session.execute(
        select(Sae.name, Match.other_feature_index, Match.cosine)
        .join(Sae, Sae.id == Match.other_sae_id)
        .where(Match.sae_id == sae.id, Match.feature_index == feature_index)
        .order_by(Match.other_sae_id)
    )
    return [
        ClosestLatent(sae=name, feature_index=index, cosine=cosine) for name, index, cosine in rows
    ]


def _absorbers(session: Session, sae: Sae, stored: list[dict], vocab: list[str]) -> list[Absorber]:
    """The stored absorbers, each with its frequency and top tokens (one query for all)."""
    found = {
        index: (frequency, top_tokens)
        for index, frequency, top_tokens in session.execute(
            select(Feature.feature_index, Feature.frequency, Feature.top_tokens).where(
                Feature.sae_id == sae.id,
                Feature.feature_index.in_([absorber["feature_index"] for absorber in stored]),
            )
        )
    }
    return [
        Absorber(
            **absorber,
            frequency=found[absorber["feature_index"]][0],
            top_tokens=_token_counts(found[absorber["feature_index"]][1][:ABSORBER_TOKENS], vocab),
        )
        for absorber in stored
    ]


def _positional(feature: Feature) -> Positional:
    """Firing rate and mean activation per position; no mean where it never fires."""
    columns = Feature.__table__.c
    rate = codec.unpack(columns.position_rate, feature.position_rate).astype(np.float64)
    mean = codec.unpack(columns.position_mean, feature.position_mean).astype(np.float64)
    return Positional(
        firing_rate=np.round(rate, 6).tolist(),
        mean_activation=[
            round(value, 6) if fired else None
            for value, fired in zip(mean.tolist(), (rate > 0).tolist(), strict=True)
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


def search_tokens(
    session: Session, sae_name: str, query: str, limit: int = 10, latents_per_token: int = 5
) -> TokenSearch:
    """Tokens equal to the query (ignoring surrounding spaces, unless it is only whitespace)
    first, then tokens containing it;
    for each, the latents most associated with it and a couple of contexts where they fire.

    A bounded number of queries whatever the matches: the token counts, the matched tokens'
    latents, those latents' examples, and the sequences the examples lie in."""
    sae = _sae(session, sae_name)
    vocab = _vocab(session, sae.corpus_id)
    # Surrounding spaces are ignored, but a whitespace token (a line break, an indent) is
    # searched as it is.
    needle = query.strip() or query
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
    chosen = ranked[:limit]
    latents: dict[int, list[TokenLatent]] = defaultdict(list)
    for latent in session.scalars(
        select(TokenLatent)
        .where(
            TokenLatent.sae_id == sae.id,
            TokenLatent.token_id.in_(chosen),
            TokenLatent.rank < latents_per_token,
        )
        .order_by(TokenLatent.token_id, TokenLatent.rank)
    ):
        latents[latent.token_id].append(latent)
    examples = _examples_by_activation(
        session, sae, {latent.feature_index for found in latents.values() for latent in found}
    )
    renderer = _ExampleRenderer(session, sae, vocab)
    renderer.load([example for found in examples.values() for example in found])
    matches = [
        TokenMatch(
            token_id=token_id,
            token=vocab[token_id],
            exact=token_id in exact_set,
            count=counts.get(token_id, 0),
            latents=[
                LatentForToken(
                    feature_index=latent.feature_index,
                    count=latent.count,
                    mean_activation=latent.mean_activation,
                    # Up to two contexts where the latent fires on this very token.
                    examples=[
                        renderer.render(example)
                        for example in examples[latent.feature_index]
                        if renderer.token_at(example) == token_id
                    ][:2],
                )
                for latent in latents[token_id]
            ],
        )
        for token_id in chosen
    ]
    return TokenSearch(sae=sae.name, query=query, matches=matches)


# Latents listed per context of a phrase search.
PHRASE_LATENTS = 8
COMPUTED_NOTE = (
    "computed by the inference process on the corpus's tokens up to the phrase: each latent's "
    "highest activation on the phrase's tokens"
)
STORED_NOTE = (
    "from the stored examples: the latents with an example (top, bottom, quantile or "
    "decoder-top) on one of the phrase's tokens, with its activation there; a latent that "
    "fires here without an example here is not listed"
)
# Runs the model and SAE on token ids: per token, (latent, activation) strongest first.
LatentRunner = Callable[[list[int]], list[list[tuple[int, float]]]]


def search_phrase(
    session: Session,
    sae_name: str,
    phrase: str,
    limit: int,
    after: str | None = None,
    run: LatentRunner | None = None,
) -> PhraseSearch:
    """The contexts of the corpus where `phrase` occurs (ignoring case), in corpus order from
    the cursor `after`, each with the latents that fire on it: computed with `run` if given,
    else from the stored examples."""
    sae = _sae(session, sae_name)
    if len(phrase) < corpus_text.MIN_PHRASE_CHARACTERS:
        raise BadRequestError(
            f"a phrase needs at least {corpus_text.MIN_PHRASE_CHARACTERS} characters; "
            "search a single token with the token search"
        )
    if "\x00" in phrase:  # FTS5's query strings end at a NUL
        raise BadRequestError("a phrase cannot contain a NUL character")
    vocab = _vocab(session, sae.corpus_id)
    after_sequence, after_start = _parse_phrase_cursor(after) if after else (0, -1)
    found: list[tuple[int, corpus_text.Occurrence]] = []
    tokens: dict[int, np.ndarray] = {}
    first = after_sequence
    # One context more than the page, to know whether another page follows.
    while len(found) <= limit:
        sequences = corpus_text.matching_sequences(session, sae.corpus_id, phrase, first, limit + 1)
        tokens |= _sequence_tokens(session, sae.corpus_id, sequences)
        found += [
            (index, occurrence)
            for index in sequences
            for occurrence in corpus_text.occurrences(tokens[index], vocab, phrase)
            if (index, occurrence.start) > (after_sequence, after_start)
        ]
        if len(sequences) <= limit:
            break
        first = sequences[-1] + 1
    page = found[:limit]
    latents = (
        _computed_phrase_latents(run, tokens, page)
        if run is not None
        else _stored_phrase_latents(session, sae, page)
    )
    contexts = []
    for (index, occurrence), listed in zip(page, latents, strict=True):
        low = max(0, occurrence.start - WINDOW_LEFT)
        window = tokens[index][low : occurrence.end + WINDOW_RIGHT].tolist()
        contexts.append(
            PhraseContext(
                sequence_index=index,
                start=occurrence.start,
                end=occurrence.end,
                tokens=[vocab[t] for t in window],
                token_ids=window,
                focus=occurrence.start - low,
                latents=listed,
            )
        )
    last = page[-1] if page else None
    return PhraseSearch(
        sae=sae.name,
        phrase=phrase,
        sequences=corpus_text.count_sequences(session, sae.corpus_id, phrase),
        latents_source="computed" if run is not None else "stored",
        latents_note=COMPUTED_NOTE if run is not None else STORED_NOTE,
        contexts=contexts,
        next_cursor=f"{last[0]}:{last[1].start}" if len(found) > limit and last else None,
    )


def _parse_phrase_cursor(cursor: str) -> tuple[int, int]:
    """(sequence, token) of a phrase search's `next_cursor`."""
    sequence, _, start = cursor.partition(":")
    try:
        parsed = int(sequence), int(start)
    except ValueError:
        parsed = None
    if parsed is None or not all(0 <= value < INTEGER_LIMIT for value in parsed):
        raise BadRequestError(f"cursor {cursor!r} is not a phrase search's (sequence:token)")
    return parsed


def _sequence_tokens(
    session: Session, corpus_id: int, indices: Iterable[int]
) -> dict[int, np.ndarray]:
    column = CorpusSequence.__table__.c.token_ids
    rows = session.execute(
        select(CorpusSequence.sequence_index, CorpusSequence.token_ids).where(
            CorpusSequence.corpus_id == corpus_id, CorpusSequence.sequence_index.in_(indices)
        )
    )
    return {index: codec.unpack(column, blob) for index, blob in rows}


def _strongest(activations: dict[int, float]) -> list[PhraseLatent]:
    ranked = sorted(activations.items(), key=lambda item: (-item[1], item[0]))
    return [
        PhraseLatent(feature_index=index, activation=round(value, 5))
        for index, value in ranked[:PHRASE_LATENTS]
    ]


def _computed_phrase_latents(
    run: LatentRunner,
    tokens: dict[int, np.ndarray],
    page: list[tuple[int, corpus_text.Occurrence]],
) -> list[list[PhraseLatent]]:
    """Each context's latents from one run per sequence, over its tokens up to the last phrase
    on the page (the model is causal: the prefix is all that counts)."""
    ends: dict[int, int] = defaultdict(int)
    for index, occurrence in page:
        ends[index] = max(ends[index], occurrence.end)
    per_token = {index: run(tokens[index][:end].tolist()) for index, end in ends.items()}
    listed = []
    for index, occurrence in page:
        best: dict[int, float] = {}
        for token in per_token[index][occurrence.start : occurrence.end]:
            for latent, activation in token:
                best[latent] = max(best.get(latent, 0.0), activation)
        listed.append(_strongest(best))
    return listed


def _stored_phrase_latents(
    session: Session, sae: Sae, page: list[tuple[int, corpus_text.Occurrence]]
) -> list[list[PhraseLatent]]:
    """Each context's latents from the examples stored on its tokens."""
    columns = SequenceExamples.__table__.c
    stored = {
        row.sequence_index: tuple(
            codec.unpack(columns[name], getattr(row, name))
            for name in ("position", "feature_index", "activation")
        )
        for row in session.execute(
            select(SequenceExamples).where(
                SequenceExamples.sae_id == sae.id,
                SequenceExamples.sequence_index.in_({index for index, _ in page}),
            )
        ).scalars()
    }
    listed = []
    for index, occurrence in page:
        best: dict[int, float] = {}
        if index in stored:
            position, feature, activation = stored[index]
            low, high = np.searchsorted(position, [occurrence.start, occurrence.end])
            for latent, value in zip(
                feature[low:high].tolist(), activation[low:high].tolist(), strict=True
            ):
                best[latent] = max(best.get(latent, 0.0), value)
        listed.append(_strongest(best))
    return listed


def _examples_by_activation(
    session: Session, sae: Sae, features: set[int]
) -> dict[int, list[_StoredExample]]:
    """The searched kinds of examples of each feature, highest activation first."""
    stored: dict[int, list[_StoredExample]] = defaultdict(list)
    rows = session.execute(
        select(FeatureExamples.__table__)
        .where(
            FeatureExamples.sae_id == sae.id,
            FeatureExamples.feature_index.in_(features),
            FeatureExamples.kind.in_(SEARCHED_KINDS),
        )
        .order_by(FeatureExamples.feature_index, FeatureExamples.kind)
    )
    for row in rows:
        stored[row.feature_index] += _stored_examples(row)
    for examples in stored.values():
        examples.sort(key=lambda example: -example.activation)
    return stored


def flags_report(
    session: Session, sae_name: str, threshold: float, limit: int = 100
) -> FlagsReport:
    """Counts and members of each flag group, at `threshold` for the adjustable one (not the
    build's), which leads."""
    sae = _sae(session, sae_name)
    groups = []
    for flag in sorted(FLAGS, key=lambda flag: flag.default_threshold is None):
        base = select(Feature.feature_index).where(
            Feature.sae_id == sae.id, flag_clause(flag, threshold)
        )
        ranked_by = getattr(Feature, flag.ranked_by)
        ordering = ranked_by.desc() if flag.descending else ranked_by.asc()
        count = session.scalar(select(func.count()).select_from(base.subquery()))
        members = session.scalars(base.order_by(ordering, Feature.feature_index).limit(limit))
        groups.append(
            FlagGroup(
                name=flag.name,
                rule=flag.rule.format(threshold=threshold),
                count=count,
                features=list(members),
            )
        )
    return FlagsReport(sae=sae.name, threshold=threshold, groups=groups)


def latent_summaries(
    session: Session, sae_name: str, indices: list[int], n_tokens: int = 3
) -> dict[int, LatentSummary]:
    """Frequency and the tokens it fires on most, of each latent listed (one query), for lists
    of latents shown inline."""
    sae = _sae(session, sae_name)
    if not indices:
        return {}
    vocab = _vocab(session, sae.corpus_id)
    rows = session.execute(
        select(Feature.feature_index, Feature.frequency, Feature.top_tokens).where(
            Feature.sae_id == sae.id, Feature.feature_index.in_(sorted(set(indices)))
        )
    )
    return {
        index: LatentSummary(
            frequency=frequency, top_tokens=_token_counts(top_tokens[:n_tokens], vocab)
        )
        for index, frequency, top_tokens in rows
    }


def threshold_ablation(session: Session, sae_name: str) -> ThresholdAblation:
    sae = _sae(session, sae_name)
    return ThresholdAblation(
        sae=sae.name,
        eval_tokens=sae.eval_tokens,
        ce_clean=sae.ce_clean,
        ce_zero=sae.ce_zero,
        rules=sae.threshold_ablation,
    )


def _pair_summary(stored: StoredComparison, sae: str, other: str) -> PairSummary:
    return PairSummary(
        sae=sae,
        other=other,
        same_model_and_hook=stored.same_model_and_hook,
        latents=stored.latents,
        share_above_0_9=stored.share_above_0_9,
        share_above_0_8=stored.share_above_0_8,
        median_best_cosine=stored.median_best_cosine,
    )


def compare_saes(
    session: Session,
    sae_name: str,
    other_name: str,
    threshold: float = 0.5,
    sort: UnmatchedSort = UnmatchedSort.frequency,
    order: SortOrder = SortOrder.desc,
    after: str | None = None,
    limit: int = 50,
) -> Comparison:
    """How `sae_name`'s latents are matched in `other_name` by decoder cosine, and one page of
    its live latents whose best cosine is below `threshold`."""
    sae, other = _sae(session, sae_name), _sae(session, other_name)
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
        .add_columns(Feature.frequency, Feature.top_tokens)
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
        _keyset(unmatched, column, Match.feature_index, order, after, sort).limit(limit + 1)
    ).all()
    vocab = _vocab(session, sae.corpus_id)
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = _cursor(getattr(last, sort.value), last.feature_index)
    counts = codec.unpack(StoredComparison.__table__.c.histogram_counts, stored.histogram_counts)
    return Comparison(
        **_pair_summary(stored, sae.name, other.name).model_dump(),
        histogram=Histogram(edges=cosine_edges().tolist(), counts=counts.tolist()),
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
                top_tokens=_token_counts(row.top_tokens[:5], vocab),
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
        query = query.where(StoredComparison.sae_id == _sae(session, sae_name).id)
    names = dict(session.execute(select(Sae.id, Sae.name)).tuples().all())
    return [
        _pair_summary(pair, names[pair.sae_id], names[pair.other_sae_id])
        for pair in session.scalars(query)
    ]


def side_by_side(session: Session) -> SaeComparison:
    """Every SAE of the file with its metrics, training and threshold ablation, and every stored
    comparison's summary."""
    saes = session.scalars(select(Sae).order_by(Sae.id))
    return SaeComparison(
        saes=[SaeSideBySide.model_validate(sae, from_attributes=True) for sae in saes],
        pairs=pair_summaries(session),
    )
