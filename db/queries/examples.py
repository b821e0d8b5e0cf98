"""Stored examples as the pages show them: windows of token strings around the example's token,
with the latent's activation on each."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field
from sqlalchemy import Row
from sqlalchemy.orm import Session

from saescope.db import codec
from saescope.db.codec import WINDOW_LEFT, WINDOW_RIGHT
from saescope.db.models import FeatureExamples, Sae
from saescope.db.queries.lookups import sequence_tokens

EXAMPLE_KINDS = ("top", "bottom", "quantile", "decoder_top")


class ExampleOut(BaseModel):
    sequence_index: int
    position: int
    activation: float
    projection: float | None = None
    tokens: list[str]
    token_ids: list[int]
    activations: list[float | None] = Field(
        description="the latent's activation on each token of the window; null where unknown"
    )
    focus: int = Field(description="index of the example's token within the window")


@dataclass
class StoredExample:
    sequence_index: int
    position: int
    activation: float
    projection: float | None
    band: int | None
    window: np.ndarray  # float32 [WINDOW_LENGTH], NaN outside the sequence


def stored_examples(row: Row) -> list[StoredExample]:
    """The examples packed in one row of the `examples` table, in stored order."""
    columns = FeatureExamples.__table__.c

    def values(name: str) -> list | None:
        unpacked = codec.unpack(columns[name], getattr(row, name))
        return None if unpacked is None else unpacked.tolist()

    sequence = values("sequence_index")
    missing = [None] * len(sequence)
    return [
        StoredExample(*fields)
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


class ExampleRenderer:
    """Turns stored examples into windows of token strings, loading each sequence once."""

    def __init__(self, session: Session, sae: Sae, vocab: list[str]) -> None:
        self.session = session
        self.corpus_id = sae.corpus_id
        self.vocab = vocab
        self.sequences: dict[int, np.ndarray] = {}

    def load(self, examples: list[StoredExample]) -> None:
        self.load_sequences({example.sequence_index for example in examples})

    def load_sequences(self, indices: set[int]) -> None:
        wanted = indices - self.sequences.keys()
        if wanted:
            self.sequences |= sequence_tokens(self.session, self.corpus_id, wanted)

    def render(self, example: StoredExample) -> ExampleOut:
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

    def render_firing(self, sequence_index: int, position: int, activation: float) -> ExampleOut:
        """The window around one firing whose activation is known at its token only."""
        tokens = self.sequences[sequence_index]
        start = max(0, position - WINDOW_LEFT)
        token_ids = tokens[start : position + WINDOW_RIGHT + 1].tolist()
        activations: list[float | None] = [None] * len(token_ids)
        activations[position - start] = round(activation, 5)
        return ExampleOut.model_construct(
            sequence_index=sequence_index,
            position=position,
            activation=activation,
            projection=None,
            tokens=[self.vocab[t] for t in token_ids],
            token_ids=token_ids,
            activations=activations,
            focus=position - start,
        )
