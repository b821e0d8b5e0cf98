"""What the build hands the writer: typed records whose fields are the tables' columns.

Column-wise records hold one entry per row (a list, or an array whose first axis is the rows);
blob columns hold arrays, which the writer packs with `db.codec`. Each record's fields are
checked against its table when this module loads, so a misnamed field fails at once, not in an
SQL statement after a whole pass.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, make_dataclass
from typing import Any

import numpy as np

from saescope.db.models import (
    Base,
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

Column = Sequence[Any] | np.ndarray


class RowSlices(Sequence[np.ndarray]):
    """A blob column whose rows are consecutive slices of one array: row i is
    values[starts[i]:starts[i + 1]], a view made when read (a wide SAE's million rows are not a
    million array objects). With `at`, index arrays into `values`, row i is gathered when read:
    values[tuple(index[starts[i]:starts[i + 1]] for index in at)], so the gathered whole never
    exists (the examples' windows, the build's largest arrays)."""

    def __init__(
        self, values: np.ndarray, starts: np.ndarray, at: tuple[np.ndarray, ...] = ()
    ) -> None:
        self.values = values
        self.at = at
        self.bounds = np.r_[starts, len(at[0]) if at else len(values)]

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, row: int) -> np.ndarray:  # type: ignore[override]
        return self._between(self.bounds[row], self.bounds[row + 1])

    def flat(self) -> np.ndarray:
        """All rows, one after another."""
        return self._between(self.bounds[0], self.bounds[-1])

    def _between(self, first: int, last: int) -> np.ndarray:
        if self.at:
            return self.values[tuple(index[first:last] for index in self.at)]
        return self.values[first:last]


class Chained(Sequence[Any]):
    """Sequences one after another, without copying them."""

    def __init__(self, parts: Sequence[Sequence[Any]]) -> None:
        self.parts = parts
        self.ends = np.cumsum([len(part) for part in parts]).tolist()

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, row: int) -> Any:  # type: ignore[override]
        part = bisect.bisect_right(self.ends, row)
        return self.parts[part][row - (self.ends[part - 1] if part else 0)]

    def __iter__(self) -> Iterator[Any]:
        return itertools.chain.from_iterable(self.parts)


def flattened(column: Column) -> np.ndarray:
    """A column of arrays as one array, its rows one after another."""
    if isinstance(column, RowSlices):
        return column.flat()
    if isinstance(column, Chained):
        return np.concatenate([flattened(part) for part in column.parts])
    return np.concatenate([np.asarray(row) for row in column])


class JsonRows(Sequence[list[dict[str, Any]]]):
    """A JSON column of short lists, kept as arrays [rows, k] (one per key) and built into each
    row's list of {key: value} only when read: a wide SAE's millions of small dicts never exist
    at once. Floats are rounded to 6 decimals; entries where `keep` is False are left out."""

    def __init__(self, keep: np.ndarray | None = None, **arrays: np.ndarray) -> None:
        self.keep = keep
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, row: int) -> list[dict[str, Any]]:  # type: ignore[override]
        values = [
            [round(x, 6) for x in array[row].tolist()]
            if array.dtype.kind == "f"
            else array[row].tolist()
            for array in self.arrays.values()
        ]
        keep = None if self.keep is None else self.keep[row]
        return [
            dict(zip(self.arrays, entry, strict=True))
            for j, entry in enumerate(zip(*values, strict=True))
            if keep is None or keep[j]
        ]


@dataclass
class CorpusRecord:
    """The tokens an SAE was built over, with the tokenizer's display strings."""

    fingerprint: str
    source: str
    """what the tokens were read from: a file, a directory, a dataset name"""
    tokenizer: str
    token_ids: np.ndarray
    """[n_sequences, context_length]"""
    vocab: list[str]
    special_token_ids: set[int]


def _record_of(name: str, model: type[Base], supplied: set[str]) -> type:
    """A record with a field per column of `model`'s table, but for those the writer supplies."""
    record = make_dataclass(
        name,
        [(column.key, Any) for column in model.__table__.columns if column.key not in supplied],
    )
    record.__module__ = __name__
    return record


# The `saes` row, but for its id and the name and corpus the writer fills in.
SAE_SUPPLIED = {"id", "name", "corpus_id"}
SaeRecord = _record_of("SaeRecord", Sae, SAE_SUPPLIED)
# The `features` rows of one SAE, column by column, in feature order (its metrics are declared
# in `db.metrics`).
FEATURE_SUPPLIED = {"sae_id"}
FeatureColumns = _record_of("FeatureColumns", Feature, FEATURE_SUPPLIED)


@dataclass
class ExampleColumns:
    """The `examples` rows: one per feature and kind, each field an array over its examples."""

    feature_index: Column
    kind: Column
    sequence_index: Column
    position: Column
    activation: Column
    band: Column
    projection: Column
    window_activations: Column

    @classmethod
    def concatenate(cls, parts: Sequence[ExampleColumns]) -> ExampleColumns:
        return cls(
            **{
                field.name: Chained([getattr(part, field.name) for part in parts])
                for field in fields(cls)
            }
        )


@dataclass
class SequenceExampleColumns:
    """The `sequence_examples` rows: one per sequence, each field an array over its entries."""

    sequence_index: Column
    position: Column
    feature_index: Column
    activation: Column

    @classmethod
    def of(cls, examples: ExampleColumns) -> SequenceExampleColumns:
        """The examples' (sequence, position, latent) entries, each once, grouped by sequence."""
        counts = [len(positions) for positions in examples.position]
        if sum(counts) == 0:
            return cls([], [], [], [])
        # One int64 key per entry, ordered by sequence, position, latent, from which the unique
        # entries' fields are read back: a wide SAE has millions of entries.
        sequence, position = (
            flattened(getattr(examples, name)) for name in ("sequence_index", "position")
        )
        width = max(examples.feature_index) + 1
        positions = int(position.max()) + 1
        key = sequence.astype(np.int64) * positions
        key += position
        del sequence, position
        key *= width
        key += np.repeat(np.asarray(examples.feature_index, np.int64), counts)
        key, first = np.unique(key, return_index=True)
        activation = flattened(examples.activation)[first]
        del first
        feature = key % width
        key //= width
        position = key % positions
        sequence = key // positions
        del key
        starts = np.flatnonzero(np.diff(sequence, prepend=-1))
        return cls(
            sequence_index=sequence[starts],
            position=np.split(position, starts[1:]),
            feature_index=np.split(feature, starts[1:]),
            activation=np.split(activation, starts[1:]),
        )


@dataclass
class TokenStatColumns:
    token_id: Column
    count: Column


@dataclass
class TokenLatentColumns:
    token_id: Column
    rank: Column
    feature_index: Column
    count: Column
    mean_activation: Column
    specificity: Column
    sequence_index: Column
    position: Column
    activation: Column


@dataclass
class SequenceColumns:
    sequence_index: Column
    token_ids: Column


@dataclass
class VocabColumns:
    token_id: Column
    token: Column
    special: Column


@dataclass
class MatchColumns:
    """Each latent's closest latent of the other SAE."""

    feature_index: Column
    other_feature_index: Column
    cosine: Column


@dataclass
class ComparisonRecord:
    """One direction of a comparison of two SAEs, named; the writer fills in their ids."""

    sae: str
    other: str
    latents: int
    share_above_0_9: float
    share_above_0_8: float
    median_best_cosine: float
    histogram_counts: np.ndarray
    same_model_and_hook: bool
    chance_median_best_cosine: float
    chance_max_cosine: float
    chance_histogram_counts: np.ndarray
    latents_above_chance: int
    matches: MatchColumns


@dataclass
class StoredDecoder:
    """An SAE as a comparison needs it: its decoder rows and which latents are live."""

    name: str
    model: str
    hook: str
    decoder: np.ndarray
    """[d_sae, d_in]"""
    live: np.ndarray
    """[d_sae] bool"""


@dataclass
class SaeRecords:
    """Everything the build writes for one SAE."""

    sae: SaeRecord
    features: FeatureColumns
    examples: ExampleColumns
    token_stats: TokenStatColumns
    token_latents: TokenLatentColumns


# Each record and its table; the writer supplies the keys named beside them.
TABLES: list[tuple[type, type[Base], set[str]]] = [
    (SaeRecord, Sae, SAE_SUPPLIED),
    (FeatureColumns, Feature, FEATURE_SUPPLIED),
    (ExampleColumns, FeatureExamples, {"sae_id"}),
    (SequenceExampleColumns, SequenceExamples, {"sae_id"}),
    (TokenStatColumns, TokenStat, {"sae_id"}),
    (TokenLatentColumns, TokenLatent, {"sae_id"}),
    (MatchColumns, Match, {"sae_id", "other_sae_id"}),
    (SequenceColumns, CorpusSequence, {"corpus_id"}),
    (VocabColumns, VocabToken, {"corpus_id"}),
]


def _check_fields() -> None:
    for record, model, supplied in TABLES:
        names = {field.name for field in fields(record)}
        columns = {column.key for column in model.__table__.columns} - supplied
        if names != columns:
            raise TypeError(
                f"{record.__name__} does not match table {model.__tablename__}: "
                f"missing {sorted(columns - names)}, unknown {sorted(names - columns)}"
            )


_check_fields()
