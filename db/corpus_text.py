"""The corpus's text, indexed for phrase search: an FTS5 table of character trigrams.

A sequence's text is the concatenation of its tokens' display strings, so a character offset in
it maps back to a token. The index matches substrings of at least three characters, ignoring
case, as its trigram tokenizer does; `occurrences` finds them again in a sequence's text, with
the same rule. It keeps the text too (a contentless index would halve it, but could not be read
back: `sqlite3 .dump` and its kin fail on such a table).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from sqlalchemy import text
from sqlalchemy.orm import Session

TABLE = "corpus_text"
MIN_PHRASE_CHARACTERS = 3
"""the trigram index finds nothing shorter"""
CREATE = (
    f"CREATE VIRTUAL TABLE IF NOT EXISTS {TABLE} USING fts5(text, columnsize=0, tokenize='trigram')"
)
# Every corpus of a file shares the table: a row's id is its corpus id and sequence index.
_SEQUENCE_BITS = 32


def rowid(corpus_id: int, sequence_index: int) -> int:
    return (corpus_id << _SEQUENCE_BITS) | sequence_index


def sequence_text(token_ids: np.ndarray, vocab: list[str]) -> str:
    return "".join(vocab[t] for t in token_ids)


def index_corpus(session: Session, corpus_id: int, token_ids: np.ndarray, vocab: list[str]) -> None:
    """Adds a corpus's sequences ([n_sequences, context_length] token ids) to the index."""
    session.connection().exec_driver_sql(
        f"INSERT INTO {TABLE} (rowid, text) VALUES (?, ?)",
        [(rowid(corpus_id, i), sequence_text(ids, vocab)) for i, ids in enumerate(token_ids)],
    )


# The rows of one corpus whose text contains the phrase, between two sequences.
_MATCHING = f"FROM {TABLE} WHERE {TABLE} MATCH :phrase AND rowid BETWEEN :low AND :high"


def _matching_parameters(corpus_id: int, phrase: str) -> dict[str, object]:
    return {
        # FTS5's query for the phrase as one string (its double quotes doubled).
        "phrase": '"' + phrase.replace('"', '""') + '"',
        "low": rowid(corpus_id, 0),
        "high": rowid(corpus_id + 1, 0) - 1,
    }


def matching_sequences(
    session: Session, corpus_id: int, phrase: str, first: int, limit: int, backward: bool = False
) -> list[int]:
    """The indices of up to `limit` sequences whose text contains the phrase (ignoring case):
    from `first` on in order, or `backward` from `first` down."""
    parameters = _matching_parameters(corpus_id, phrase) | {"limit": limit}
    if backward:
        parameters["high"] = rowid(corpus_id, first)
    else:
        parameters["low"] = rowid(corpus_id, first)
    found = session.execute(
        text(f"SELECT rowid {_MATCHING} ORDER BY rowid {'DESC' if backward else ''} LIMIT :limit"),
        parameters,
    )
    return [value - rowid(corpus_id, 0) for (value,) in found]


def count_sequences(session: Session, corpus_id: int, phrase: str) -> int:
    """How many sequences of the corpus contain the phrase."""
    return session.execute(
        text(f"SELECT count(*) {_MATCHING}"), _matching_parameters(corpus_id, phrase)
    ).scalar_one()


@dataclass(frozen=True)
class Occurrence:
    """The tokens a phrase spans in a sequence: from `start` to `end` (exclusive)."""

    start: int
    end: int


def occurrences(token_ids: np.ndarray, vocab: list[str], phrase: str) -> list[Occurrence]:
    """Where the phrase occurs in the sequence's text (ignoring case, not overlapping), as token
    spans."""
    ends = np.cumsum([len(vocab[t]) for t in token_ids])
    return [
        Occurrence(
            int(np.searchsorted(ends, found.start(), side="right")),
            int(np.searchsorted(ends, found.end() - 1, side="right")) + 1,
        )
        for found in re.finditer(re.escape(phrase), sequence_text(token_ids, vocab), re.IGNORECASE)
    ]
