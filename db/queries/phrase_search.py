"""Phrase search over the corpus's text: every context where a phrase occurs, in corpus order,
with the latents that fire on it (computed by the inference process, or from the stored
examples), dense ones left out on request, and a summary of the latents over the phrase's first
contexts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from saescope.db import codec, corpus_text
from saescope.db.activations import SUMMARY_LATENTS, TextLatent
from saescope.db.codec import WINDOW_LEFT, WINDOW_RIGHT
from saescope.db.corpus_text import Occurrence
from saescope.db.metrics import MAX_FREQUENCY
from saescope.db.models import Feature, Sae, SequenceExamples
from saescope.db.queries.lookups import BadRequestError, sae_row, sequence_tokens, vocab
from saescope.db.queries.paging import INTEGER_LIMIT

# Contexts per page unless asked for another number.
CONTEXTS_PER_PAGE = 20
# The summary covers the phrase's first contexts in corpus order, at most this many.
SUMMARY_CONTEXTS = 60
# Latents listed per context.
PHRASE_LATENTS = 8


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
    max_frequency: float = Field(description=MAX_FREQUENCY)
    summary_contexts: int = Field(
        description="contexts the summary covers: the phrase's first, in corpus order"
    )
    summary: list[TextLatent] = Field(
        description=f"the {SUMMARY_LATENTS} latents most specific to the phrase over those "
        "contexts: per context its highest activation on the phrase (zeros included), averaged, "
        "as a multiple of its mean activation per corpus token; among latents firing on at "
        "least min_token_firings of them (or all, if fewer)"
    )
    contexts: list[PhraseContext] = Field(description="in corpus order")
    next_cursor: str | None = Field(description="`after` for the next page; null on the last")
    previous_cursor: str | None = Field(
        description="`before` for the previous page; null on the first"
    )


COMPUTED_NOTE = (
    "computed by the inference process on the corpus's tokens up to the phrase: each latent's "
    "highest activation on the phrase's tokens"
)
STORED_NOTE = (
    "from the stored examples: the latents with an example (top, bottom, quantile or "
    "decoder-top) on one of the phrase's tokens where it fires, with its activation there; a "
    "latent that fires here without an example here is not listed"
)
# A context: the sequence it lies in and the phrase's tokens there.
Context = tuple[int, Occurrence]
# Runs the model and SAE on sequences (token ids, spans (start, end)): per sequence and span,
# every latent firing on the span's tokens with its highest activation there.
SpanRunner = Callable[[list[tuple[list[int], list[tuple[int, int]]]]], list[list[dict[int, float]]]]


def search_phrase(
    session: Session,
    sae_name: str,
    phrase: str,
    limit: int,
    *,
    after: str | None,
    before: str | None,
    max_frequency: float | None,
    run: SpanRunner | None = None,
) -> PhraseSearch:
    """The contexts of the corpus where `phrase` occurs (ignoring case), in corpus order after
    the cursor `after` (or the `limit` ones before `before`), each with the latents that fire
    on it that fire on at most `max_frequency` of all tokens (default: the SAE's high-frequency
    threshold): computed with `run` if given, else from the stored examples; and the summary of
    the latents over the phrase's first SUMMARY_CONTEXTS contexts."""
    sae = sae_row(session, sae_name)
    if len(phrase) < corpus_text.MIN_PHRASE_CHARACTERS:
        raise BadRequestError(
            f"a phrase needs at least {corpus_text.MIN_PHRASE_CHARACTERS} characters; "
            "search a single token with the token search"
        )
    if "\x00" in phrase:  # FTS5's query strings end at a NUL
        raise BadRequestError("a phrase cannot contain a NUL character")
    if after and before:
        raise BadRequestError("give `after` or `before`, not both")
    max_frequency = sae.high_frequency_threshold if max_frequency is None else max_frequency
    finder = _ContextFinder(session, sae, phrase)
    if before:
        page, more_before = finder.before(_parse_phrase_cursor(before), limit)
        more_after = True
    else:
        page, more_after = finder.after(_parse_phrase_cursor(after) if after else None, limit)
        more_before = after is not None
    pool, _ = finder.after(None, SUMMARY_CONTEXTS)
    wanted = list(dict.fromkeys(page + pool))
    fired = (
        _computed_latents(run, finder.tokens, wanted)
        if run is not None
        else _stored_latents(session, sae, wanted)
    )
    firing = _firing(session, sae, {latent for found in fired.values() for latent in found})
    kept = {
        context: {j: value for j, value in found.items() if firing[j][0] <= max_frequency}
        for context, found in fired.items()
    }
    strings = finder.strings
    contexts = []
    for index, occurrence in page:
        low = max(0, occurrence.start - WINDOW_LEFT)
        window = finder.tokens[index][low : occurrence.end + WINDOW_RIGHT].tolist()
        contexts.append(
            PhraseContext(
                sequence_index=index,
                start=occurrence.start,
                end=occurrence.end,
                tokens=[strings[t] for t in window],
                token_ids=window,
                focus=occurrence.start - low,
                latents=_strongest(kept[(index, occurrence)]),
            )
        )
    minimum = min(sae.config["min_token_firings"], len(pool))
    return PhraseSearch(
        sae=sae.name,
        phrase=phrase,
        sequences=corpus_text.count_sequences(session, sae.corpus_id, phrase),
        latents_source="computed" if run is not None else "stored",
        latents_note=COMPUTED_NOTE if run is not None else STORED_NOTE,
        max_frequency=max_frequency,
        summary_contexts=len(pool),
        summary=_summary([kept[context] for context in pool], firing, minimum),
        contexts=contexts,
        next_cursor=_cursor(page[-1]) if page and more_after else None,
        previous_cursor=_cursor(page[0]) if page and more_before else None,
    )


class _ContextFinder:
    """The phrase's contexts in corpus order, reading each sequence's tokens once."""

    def __init__(self, session: Session, sae: Sae, phrase: str) -> None:
        self.session, self.corpus_id, self.phrase = session, sae.corpus_id, phrase
        self.strings = vocab(session, sae.corpus_id)
        self.tokens: dict[int, np.ndarray] = {}

    def _in(self, sequences: list[int]) -> list[Context]:
        self.tokens |= sequence_tokens(
            self.session, self.corpus_id, set(sequences) - self.tokens.keys()
        )
        return [
            (index, occurrence)
            for index in sequences
            for occurrence in corpus_text.occurrences(self.tokens[index], self.strings, self.phrase)
        ]

    def after(self, cursor: tuple[int, int] | None, limit: int) -> tuple[list[Context], bool]:
        """The first `limit` contexts after the cursor (from the start without one), and whether
        more follow."""
        sequence, start = cursor or (0, -1)
        found: list[Context] = []
        # One context more than the page, to know whether another page follows.
        while len(found) <= limit:
            sequences = corpus_text.matching_sequences(
                self.session, self.corpus_id, self.phrase, sequence, limit + 1
            )
            found += [c for c in self._in(sequences) if (c[0], c[1].start) > (sequence, start)]
            if len(sequences) <= limit:
                break
            sequence, start = sequences[-1] + 1, -1
        return found[:limit], len(found) > limit

    def before(self, cursor: tuple[int, int], limit: int) -> tuple[list[Context], bool]:
        """The last `limit` contexts before the cursor, and whether more precede them."""
        sequence, start = cursor
        found: list[Context] = []
        while len(found) <= limit and sequence >= 0:
            sequences = corpus_text.matching_sequences(
                self.session, self.corpus_id, self.phrase, sequence, limit + 1, backward=True
            )
            found = [
                c for c in self._in(sequences[::-1]) if (c[0], c[1].start) < (sequence, start)
            ] + found
            if len(sequences) <= limit:
                break
            sequence, start = sequences[-1] - 1, INTEGER_LIMIT
        return found[-limit:], len(found) > limit


def _cursor(context: Context) -> str:
    return f"{context[0]}:{context[1].start}"


def _parse_phrase_cursor(cursor: str) -> tuple[int, int]:
    """(sequence, token) of a phrase search's cursor."""
    sequence, _, start = cursor.partition(":")
    try:
        parsed = int(sequence), int(start)
    except ValueError:
        parsed = None
    if parsed is None or not all(0 <= value < INTEGER_LIMIT for value in parsed):
        raise BadRequestError(f"cursor {cursor!r} is not a phrase search's (sequence:token)")
    return parsed


def _strongest(activations: dict[int, float]) -> list[PhraseLatent]:
    ranked = sorted(activations.items(), key=lambda item: (-item[1], item[0]))
    return [
        PhraseLatent(feature_index=index, activation=round(value, 5))
        for index, value in ranked[:PHRASE_LATENTS]
    ]


def _firing(session: Session, sae: Sae, latents: set[int]) -> dict[int, tuple[float, float]]:
    """Each latent's frequency and mean activation over the corpus's tokens (zeros included)."""
    rows = session.execute(
        select(Feature.feature_index, Feature.frequency, Feature.mean_activation).where(
            Feature.sae_id == sae.id, Feature.feature_index.in_(latents)
        )
    )
    return {index: (frequency, frequency * mean) for index, frequency, mean in rows}


def _summary(
    contexts: list[dict[int, float]], firing: dict[int, tuple[float, float]], minimum: int
) -> list[TextLatent]:
    """The latents most specific to the phrase over `contexts` (see `PhraseSearch.summary`)."""
    fires_on: dict[int, int] = {}
    total: dict[int, float] = {}
    maximum: dict[int, float] = {}
    for found in contexts:
        for latent, value in found.items():
            fires_on[latent] = fires_on.get(latent, 0) + 1
            total[latent] = total.get(latent, 0.0) + value
            maximum[latent] = max(maximum.get(latent, 0.0), value)
    specificity = {
        latent: total[latent] / len(contexts) / firing[latent][1]
        for latent, count in fires_on.items()
        if count >= minimum and firing[latent][1] > 0
    }
    ranked = sorted(specificity, key=lambda latent: (-specificity[latent], latent))
    return [
        TextLatent(
            feature_index=latent,
            fires_on=fires_on[latent],
            max_activation=round(maximum[latent], 5),
            specificity=specificity[latent],
        )
        for latent in ranked[:SUMMARY_LATENTS]
    ]


def _computed_latents(
    run: SpanRunner, tokens: dict[int, np.ndarray], contexts: list[Context]
) -> dict[Context, dict[int, float]]:
    """Each context's latents from one run over them all: each sequence once, up to its last
    phrase's end (the model is causal: the prefix is all that counts)."""
    by_sequence: dict[int, list[Occurrence]] = {}
    for index, occurrence in contexts:
        by_sequence.setdefault(index, []).append(occurrence)
    if not by_sequence:
        return {}
    asked = [
        (
            tokens[index][: max(o.end for o in occurrences)].tolist(),
            [(o.start, o.end) for o in occurrences],
        )
        for index, occurrences in by_sequence.items()
    ]
    found = {}
    for (index, occurrences), answers in zip(by_sequence.items(), run(asked), strict=True):
        found |= {(index, o): latents for o, latents in zip(occurrences, answers, strict=True)}
    return found


def _stored_latents(
    session: Session, sae: Sae, contexts: list[Context]
) -> dict[Context, dict[int, float]]:
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
                SequenceExamples.sequence_index.in_({index for index, _ in contexts}),
            )
        ).scalars()
    }
    found: dict[Context, dict[int, float]] = {}
    for index, occurrence in contexts:
        best: dict[int, float] = {}
        if index in stored:
            position, feature, activation = stored[index]
            low, high = np.searchsorted(position, [occurrence.start, occurrence.end])
            for latent, value in zip(
                feature[low:high].tolist(), activation[low:high].tolist(), strict=True
            ):
                if value > 0:  # a decoder-top example may lie where the latent is off
                    best[latent] = max(best.get(latent, 0.0), value)
        found[(index, occurrence)] = best
    return found
