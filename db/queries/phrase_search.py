"""Phrase search over the corpus's text: every context where a phrase occurs, in corpus order,
with the latents that fire on it (computed by the inference process, or from the stored
examples)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from saescope.db import codec, corpus_text
from saescope.db.codec import WINDOW_LEFT, WINDOW_RIGHT
from saescope.db.models import Sae, SequenceExamples
from saescope.db.queries.lookups import BadRequestError, sae_row, sequence_tokens, vocab
from saescope.db.queries.paging import INTEGER_LIMIT

# Contexts per page unless asked for another number.
CONTEXTS_PER_PAGE = 20


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
    sae = sae_row(session, sae_name)
    if len(phrase) < corpus_text.MIN_PHRASE_CHARACTERS:
        raise BadRequestError(
            f"a phrase needs at least {corpus_text.MIN_PHRASE_CHARACTERS} characters; "
            "search a single token with the token search"
        )
    if "\x00" in phrase:  # FTS5's query strings end at a NUL
        raise BadRequestError("a phrase cannot contain a NUL character")
    strings = vocab(session, sae.corpus_id)
    after_sequence, after_start = _parse_phrase_cursor(after) if after else (0, -1)
    found: list[tuple[int, corpus_text.Occurrence]] = []
    tokens: dict[int, np.ndarray] = {}
    first = after_sequence
    # One context more than the page, to know whether another page follows.
    while len(found) <= limit:
        sequences = corpus_text.matching_sequences(session, sae.corpus_id, phrase, first, limit + 1)
        tokens |= sequence_tokens(session, sae.corpus_id, sequences)
        found += [
            (index, occurrence)
            for index in sequences
            for occurrence in corpus_text.occurrences(tokens[index], strings, phrase)
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
                tokens=[strings[t] for t in window],
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
