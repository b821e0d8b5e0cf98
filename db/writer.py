"""Writes into a database file so that nothing ever leaves a partial file, and every build that
succeeds has its SAE in the file.

Every change is made to a copy (`rewriting`): with the output directory's lock held, the file is
copied to a temporary file beside it (or one is created), changed, synced to disk and renamed over
the original. Builds into one file take turns, each adding to what the one before wrote. A failed
or interrupted writer removes its temporary file; one that was killed leaves it, and the next
writer into that file removes it. `DatabaseWriter` adds one SAE, and checks on entry, on the file
as it is, that it can (before the long pass).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import itertools
import json
import logging
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import JSON, Engine, LargeBinary, delete, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from saescope.db import codec, corpus_text
from saescope.db.engine import (
    SchemaMismatchError,
    check_schema_version,
    connect_readonly,
    readonly_engine,
    writable_engine,
)
from saescope.db.models import (
    SAE_NAME_MAX_LENGTH,
    SCHEMA_VERSION,
    Base,
    Comparison,
    Corpus,
    CorpusSequence,
    ExternalLatentResult,
    ExternalResult,
    Feature,
    FeatureExamples,
    Match,
    Meta,
    Sae,
    SequenceExamples,
    TokenLatent,
    TokenStat,
    VocabToken,
)
from saescope.db.records import (
    ComparisonRecord,
    CorpusRecord,
    SaeRecords,
    SequenceColumns,
    SequenceExampleColumns,
    StoredDecoder,
    VocabColumns,
)

logger = logging.getLogger(__name__)

# Temporary files are hidden beside the output: `.<name>.<pid>.tmp`.
TEMPORARY_PREFIX = "."
SAE_NAME_PATTERN = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{SAE_NAME_MAX_LENGTH - 1}}}$")


class DatabaseWriteError(Exception):
    """The output cannot be written; the message says why."""


# Compares two SAEs of a file (the first the one being added, or the first named): the records of
# both directions.
Compare = Callable[[StoredDecoder, StoredDecoder], list[ComparisonRecord]]


def _insert_columns(session: Session, model: type[Base], record: Any, **constant: Any) -> None:
    """Bulk insert of a column-wise record through the driver: one executemany over rows made
    as it goes (a wide SAE's packed blobs and JSON texts never exist all at once), no per-row
    ORM work. Blob columns are packed by `db.codec`, JSON columns serialised here; a field left
    None is NULL in every row, and `constant` fills a column with one value in every row."""
    table = model.__table__
    length = len(getattr(record, fields(record)[0].name))
    if length == 0:
        return  # an empty executemany would run the statement once, with no parameters
    values: list[Iterable[Any]] = []
    for field in fields(record):
        column = table.c[field.name]
        rows = getattr(record, field.name)
        if rows is None:  # a column this record leaves empty
            values.append(itertools.repeat(None, length))
        elif isinstance(column.type, LargeBinary):
            values.append(map(functools.partial(codec.pack, column), rows))
        elif isinstance(column.type, JSON):
            values.append(map(json.dumps, rows))
        elif isinstance(rows, np.ndarray):
            values.append(rows.tolist())
        else:
            values.append(rows)
    names = [field.name for field in fields(record)] + list(constant)
    values += [itertools.repeat(value, length) for value in constant.values()]
    marks = ", ".join("?" * len(names))
    # The driver's own executemany takes an iterator; SQLAlchemy's wants a list.
    session.connection().connection.driver_connection.executemany(
        f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({marks})",
        zip(*values, strict=True),
    )


@contextlib.contextmanager
def rewriting(out: Path) -> Iterator[Engine]:
    """A writable engine on a copy of `out` (a new file if there is none), renamed into place
    when the block ends well, in turn with every other writer into the directory; the copy is
    removed whatever happens."""
    temporary = out.with_name(f"{TEMPORARY_PREFIX}{out.name}.{os.getpid()}.tmp")
    with _directory_lock(out.parent):
        _remove_stale_temporaries(out)
        try:
            existed = out.exists()
            if existed:
                _copy(out, temporary)
            else:
                temporary.touch()
            engine = writable_engine(temporary)
            try:
                if existed:
                    check_schema_version(engine)
                Base.metadata.create_all(engine)
                with engine.begin() as connection:
                    connection.exec_driver_sql(corpus_text.CREATE)
                if not existed:
                    with Session(engine) as session:
                        session.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                        session.commit()
                yield engine
            finally:
                engine.dispose()
            _sync(temporary)
            os.replace(temporary, out)
            _sync(out.parent)
        except (sqlite3.DatabaseError, DBAPIError) as error:
            reason = getattr(error, "orig", error)  # SQLAlchemy wraps the driver's error
            raise DatabaseWriteError(f"cannot write {out}: {reason}") from None
        except OSError as error:
            raise DatabaseWriteError(f"cannot write {out}: {error.strerror}") from None
        except SchemaMismatchError as error:
            raise DatabaseWriteError(f"{out}: {error}") from None
        finally:
            for path in (temporary, Path(f"{temporary}-journal")):
                path.unlink(missing_ok=True)


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on the output's directory, held from copy to rename: no lock file to
    leave behind, and released by the system if the process dies."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("another build is writing into %s; waiting for it to finish", directory)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of writers that died: with the lock held, no living writer has one."""
    for stale in out.parent.glob(f"{TEMPORARY_PREFIX}{out.name}.*.tmp*"):
        logger.info("removing %s, left by a build that did not finish", stale.name)
        stale.unlink(missing_ok=True)


def _copy(out: Path, temporary: Path) -> None:
    source = connect_readonly(out)
    target = sqlite3.connect(temporary)
    try:
        source.backup(target)
    except sqlite3.DatabaseError as error:
        if error.sqlite_errorname == "SQLITE_NOTADB":
            raise DatabaseWriteError(f"{out} is not a saescope database: {error}") from None
        raise
    finally:
        source.close()
        target.close()


def _sync(path: Path) -> None:
    """Flushes a file (or a directory's entries) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def stored_decoder(session: Session, sae: Sae) -> StoredDecoder:
    """An SAE of the file, as a comparison needs it."""
    column = Feature.__table__.c.decoder
    rows = session.execute(
        select(Feature.decoder, Feature.count)
        .where(Feature.sae_id == sae.id)
        .order_by(Feature.feature_index)
    ).all()
    return StoredDecoder(
        name=sae.name,
        model=sae.model,
        hook=sae.hook,
        decoder=np.stack([codec.unpack(column, decoder) for decoder, _ in rows]),
        live=np.array([count > 0 for _, count in rows]),
    )


def store_comparisons(session: Session, records: list[ComparisonRecord]) -> None:
    """Stores comparisons, replacing any of the same two SAEs."""
    ids = dict(session.execute(select(Sae.name, Sae.id)).tuples().all())
    for record in records:
        sae_id, other_id = ids[record.sae], ids[record.other]
        for table in (Comparison, Match):
            session.execute(
                delete(table).where(table.sae_id == sae_id, table.other_sae_id == other_id)
            )
        columns = Comparison.__table__.c
        stored = {f.name: getattr(record, f.name) for f in fields(record) if f.name in columns}
        for name in ("histogram_counts", "chance_histogram_counts"):
            stored[name] = codec.pack(columns[name], getattr(record, name))
        session.add(Comparison(sae_id=sae_id, other_sae_id=other_id, **stored))
        session.flush()
        _insert_columns(session, Match, record.matches, sae_id=sae_id, other_sae_id=other_id)


def comparable(session: Session, d_in: int, other_than: str) -> list[Sae]:
    """The SAEs of the file that read activations of width `d_in`, but the one named."""
    return list(
        session.scalars(
            select(Sae).where(Sae.d_in == d_in, Sae.name != other_than).order_by(Sae.id)
        )
    )


def add_comparison(out: Path, names: tuple[str, str], compare: Compare) -> list[ComparisonRecord]:
    """Compares two SAEs of the file each way and stores the result, replacing any earlier."""
    if not out.is_file():
        raise DatabaseWriteError(f"{out} does not exist")
    if names[0] == names[1]:
        raise DatabaseWriteError(f"compare {names[0]!r} with another SAE, not with itself")
    with rewriting(out) as engine, Session(engine) as session:
        saes = [session.scalar(select(Sae).where(Sae.name == name)) for name in names]
        missing = [name for name, sae in zip(names, saes, strict=True) if sae is None]
        if missing:
            held = ", ".join(session.scalars(select(Sae.name).order_by(Sae.id))) or "none"
            raise DatabaseWriteError(f"{out} holds no SAE named {missing[0]!r} (it holds: {held})")
        if saes[0].d_in != saes[1].d_in:
            raise DatabaseWriteError(
                f"{names[0]!r} and {names[1]!r} read activations of different widths "
                f"({saes[0].d_in} and {saes[1].d_in}): their decoders cannot be compared"
            )
        records = compare(*(stored_decoder(session, sae) for sae in saes))
        store_comparisons(session, records)
        session.commit()
    return records


class DatabaseWriter:
    """One build's output: made, it checks that the SAE can be added to the file as it is (before
    the long pass); `write` adds it."""

    def __init__(self, out: Path, name: str, replace: bool = False) -> None:
        if not SAE_NAME_PATTERN.match(name):
            raise DatabaseWriteError(
                f"SAE name {name!r} must start with a letter or digit and use only "
                f"letters, digits, '.', '_' and '-' (at most {SAE_NAME_MAX_LENGTH} characters)"
            )
        self.out = out
        self.name = name
        self.replace = replace
        if out.is_dir():
            raise DatabaseWriteError(f"{out} is a directory; give the database's file name")
        if not out.parent.is_dir():
            raise DatabaseWriteError(f"output directory {out.parent} does not exist")
        if out.exists():
            self._check_existing()

    def _check_existing(self) -> None:
        """Before the pass: the file is a saescope database of this schema, and the name is free
        (or to be replaced)."""
        try:
            engine = readonly_engine(self.out)
        except OSError as error:
            raise DatabaseWriteError(f"cannot read {self.out}: {error}") from None
        try:
            check_schema_version(engine)
            with Session(engine) as session:
                taken = session.scalar(select(Sae.id).where(Sae.name == self.name)) is not None
        except SchemaMismatchError as error:
            raise DatabaseWriteError(f"{self.out}: {error}") from None
        finally:
            engine.dispose()
        if taken and not self.replace:
            raise DatabaseWriteError(self._name_taken())

    def _name_taken(self) -> str:
        return (
            f"{self.out} already holds an SAE named {self.name!r}; "
            "choose another --name or pass --replace"
        )

    def write(
        self, corpus: CorpusRecord, records: SaeRecords, compare: Compare | None = None
    ) -> None:
        """Adds the SAE to the file, in turn with any other writer into the same directory; with
        `compare`, also its comparisons with every SAE of the file of the same input width."""
        with rewriting(self.out) as engine, Session(engine) as session:
            self._make_room(session)
            self._insert(session, corpus, records)
            if compare is not None:
                added = StoredDecoder(
                    name=self.name,
                    model=records.sae.model,
                    hook=records.sae.hook,
                    decoder=np.asarray(
                        records.features.decoder, Feature.__table__.c.decoder.info["dtype"]
                    ),
                    live=np.asarray(records.features.count) > 0,
                )
                for other in comparable(session, records.sae.d_in, self.name):
                    store_comparisons(session, compare(added, stored_decoder(session, other)))
            session.commit()
        logger.info(
            "wrote %d features and %d examples",
            len(records.features.feature_index),
            sum(len(positions) for positions in records.examples.position),
        )

    def _make_room(self, session: Session) -> None:
        """Removes the SAE of the same name when replacing it; another build may have added one
        since the check on entry."""
        existing = session.scalar(select(Sae).where(Sae.name == self.name))
        if existing is None:
            return
        if not self.replace:
            raise DatabaseWriteError(self._name_taken())
        for table in (
            FeatureExamples,
            SequenceExamples,
            Feature,
            TokenStat,
            TokenLatent,
            ExternalResult,
            ExternalLatentResult,
        ):
            session.execute(delete(table).where(table.sae_id == existing.id))
        for table in (Comparison, Match):
            session.execute(
                delete(table).where(
                    (table.sae_id == existing.id) | (table.other_sae_id == existing.id)
                )
            )
        session.delete(existing)
        session.flush()

    def _insert(self, session: Session, corpus: CorpusRecord, records: SaeRecords) -> None:
        corpus_id = self._corpus_id(session, corpus)
        sae = Sae(**asdict(records.sae), name=self.name, corpus_id=corpus_id)
        session.add(sae)
        session.flush()
        for model, columns in (
            (Feature, records.features),
            (FeatureExamples, records.examples),
            (SequenceExamples, SequenceExampleColumns.of(records.examples)),
            (TokenStat, records.token_stats),
            (TokenLatent, records.token_latents),
        ):
            _insert_columns(session, model, columns, sae_id=sae.id)

    def _corpus_id(self, session: Session, corpus: CorpusRecord) -> int:
        existing = session.scalar(select(Corpus.id).where(Corpus.fingerprint == corpus.fingerprint))
        if existing is not None:
            return existing
        n_sequences, context_length = corpus.token_ids.shape
        row = Corpus(
            fingerprint=corpus.fingerprint,
            source=corpus.source,
            tokenizer=corpus.tokenizer,
            context_length=context_length,
            n_sequences=n_sequences,
        )
        session.add(row)
        session.flush()
        _insert_columns(
            session,
            CorpusSequence,
            SequenceColumns(sequence_index=np.arange(n_sequences), token_ids=corpus.token_ids),
            corpus_id=row.id,
        )
        _insert_columns(
            session,
            VocabToken,
            VocabColumns(
                token_id=np.arange(len(corpus.vocab)),
                token=corpus.vocab,
                special=[i in corpus.special_token_ids for i in range(len(corpus.vocab))],
            ),
            corpus_id=row.id,
        )
        corpus_text.index_corpus(session, row.id, corpus.token_ids, corpus.vocab)
        return row.id


def store_external_result(
    out: Path, sae_name: str, result: ExternalResult, latents: dict[int, dict[str, Any]]
) -> None:
    """Adds (or replaces) another tool's result for an SAE of the file, with its per-latent
    values, as one atomic rewrite of the file."""
    with rewriting(out) as engine, Session(engine) as session:
        sae = session.scalar(select(Sae).where(Sae.name == sae_name))
        if sae is None:
            raise DatabaseWriteError(f"no SAE named {sae_name!r} in {out}")
        for table in (ExternalResult, ExternalLatentResult):
            same = (table.tool == result.tool) & (table.eval_type == result.eval_type)
            session.execute(delete(table).where((table.sae_id == sae.id) & same))
        result.sae_id = sae.id
        session.add(result)
        session.add_all(
            ExternalLatentResult(
                sae_id=sae.id,
                feature_index=index,
                tool=result.tool,
                eval_type=result.eval_type,
                values=values,
            )
            for index, values in latents.items()
        )
        session.commit()
