"""What every query starts from: an SAE by name, its corpus's vocabulary and sequences; the
tokens-with-counts shape many responses share; and the errors queries raise."""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import numpy as np
from pydantic import BaseModel, Field
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from saescope.db import codec
from saescope.db.metrics import SPECIFICITY
from saescope.db.models import CorpusSequence, Sae, VocabToken


class NotFoundError(Exception):
    """An SAE, feature or token that the database does not hold."""


class BadRequestError(Exception):
    """Parameters that are each well-formed but do not make sense together."""


def sae_row(session: Session, name: str) -> Sae:
    sae = session.scalar(select(Sae).where(Sae.name == name))
    if sae is None:
        raise NotFoundError(f"no SAE named {name!r}")
    return sae


# Per engine (one file, read-only, so never stale) and corpus: gone with the engine.
_VOCAB_CACHE: weakref.WeakKeyDictionary[Engine, dict[int, list[str]]] = weakref.WeakKeyDictionary()


_SAE_COUNT: weakref.WeakKeyDictionary[Engine, int] = weakref.WeakKeyDictionary()


def sae_count(engine: Engine) -> int:
    """How many SAEs the file holds, counted once per engine."""
    if engine not in _SAE_COUNT:
        with Session(engine) as session:
            _SAE_COUNT[engine] = session.scalar(select(func.count()).select_from(Sae)) or 0
    return _SAE_COUNT[engine]


def vocab(session: Session, corpus_id: int) -> list[str]:
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


def sequence_tokens(
    session: Session, corpus_id: int, indices: Iterable[int]
) -> dict[int, np.ndarray]:
    column = CorpusSequence.__table__.c.token_ids
    rows = session.execute(
        select(CorpusSequence.sequence_index, CorpusSequence.token_ids).where(
            CorpusSequence.corpus_id == corpus_id, CorpusSequence.sequence_index.in_(indices)
        )
    )
    return {index: codec.unpack(column, blob) for index, blob in rows}


class TokenCount(BaseModel):
    """A token a latent fires on."""

    token_id: int
    token: str
    count: int = Field(description="firings of the latent on the token")
    occurrences: int = Field(description="occurrences of the token in the corpus")
    mean_activation: float = Field(description="mean activation where it fires on the token")
    specificity: float = Field(description=SPECIFICITY)


def token_counts(items: list[dict], strings: list[str]) -> list[TokenCount]:
    """Stored token entries (`models.Feature.top_tokens`), with their token strings."""
    return [TokenCount(token=strings[item["token_id"]], **item) for item in items]
