"""Writes one SAE's results into a database file, so that no build ever leaves a partial file
and every build that succeeds has its SAE in the file.

Entering the writer checks, on the file as it is, that the SAE can be added (before the long pass).
`write` then takes the output directory's lock, copies the file to a temporary file beside it (or
creates one), adds the SAE, syncs it to disk and renames it over the original: builds into one
file take turns, each adding to what the one before wrote. A failed or interrupted build removes
its temporary file; one that was killed leaves it, and the next build into that file removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import JSON, LargeBinary, delete, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from saescope.db import codec
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
    Corpus,
    CorpusSequence,
    Feature,
    FeatureExamples,
    Meta,
    Sae,
    TokenLatent,
    TokenStat,
    VocabToken,
)
from saescope.db.records import CorpusRecord, SaeRecords, SequenceColumns, VocabColumns

logger = logging.getLogger(__name__)

# Temporary files are hidden beside the output: `.<name>.<pid>.tmp`.
TEMPORARY_PREFIX = "."
SAE_NAME_PATTERN = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{SAE_NAME_MAX_LENGTH - 1}}}$")


class DatabaseWriteError(Exception):
    """The output cannot be written; the message says why."""


def _insert_columns(session: Session, model: type[Base], record: Any, **constant: Any) -> None:
    """Bulk insert of a column-wise record through the driver: one executemany, no per-row ORM
    work. Blob columns are packed by `db.codec`, JSON columns serialised here; a field left None
    is NULL in every row, and `constant` fills a column with one value in every row."""
    table = model.__table__
    length = len(getattr(record, fields(record)[0].name))
    if length == 0:
        return  # an empty executemany would run the statement once, with no parameters
    values = []
    for field in fields(record):
        column = table.c[field.name]
        rows = getattr(record, field.name)
        if rows is None:  # a column this record leaves empty
            rows = [None] * length
        elif isinstance(column.type, LargeBinary):
            rows = [codec.pack(column, row) for row in rows]
        elif isinstance(column.type, JSON):
            rows = [json.dumps(row) for row in rows]
        elif isinstance(rows, np.ndarray):
            rows = rows.tolist()
        values.append(rows)
    names = [field.name for field in fields(record)] + list(constant)
    values += [[value] * length for value in constant.values()]
    marks = ", ".join("?" * len(names))
    session.connection().exec_driver_sql(
        f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({marks})",
        list(zip(*values, strict=True)),
    )


class DatabaseWriter:
    """Context manager around one build's output; see the module's docstring."""

    def __init__(self, out: Path, name: str, replace: bool = False) -> None:
        if not SAE_NAME_PATTERN.match(name):
            raise DatabaseWriteError(
                f"SAE name {name!r} must start with a letter or digit and use only "
                f"letters, digits, '.', '_' and '-' (at most {SAE_NAME_MAX_LENGTH} characters)"
            )
        self.out = out
        self.name = name
        self.replace = replace
        self.temporary = out.with_name(f"{TEMPORARY_PREFIX}{out.name}.{os.getpid()}.tmp")

    def __enter__(self) -> DatabaseWriter:
        if self.out.is_dir():
            raise DatabaseWriteError(f"{self.out} is a directory; give the database's file name")
        if not self.out.parent.is_dir():
            raise DatabaseWriteError(f"output directory {self.out.parent} does not exist")
        if self.out.exists():
            self._check_existing()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._remove_temporary()

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

    def write(self, corpus: CorpusRecord, records: SaeRecords) -> None:
        """Adds the SAE to the file, in turn with any other build into the same directory."""
        with self._directory_lock():
            self._remove_stale_temporaries()
            try:
                engine = self._prepare_temporary()
                try:
                    self._insert(engine, corpus, records)
                finally:
                    engine.dispose()
                _sync(self.temporary)
                os.replace(self.temporary, self.out)
                _sync(self.out.parent)
            except (sqlite3.DatabaseError, DBAPIError) as error:
                reason = getattr(error, "orig", error)  # SQLAlchemy wraps the driver's error
                raise DatabaseWriteError(f"cannot write {self.out}: {reason}") from None
            except OSError as error:
                raise DatabaseWriteError(f"cannot write {self.out}: {error.strerror}") from None
            except SchemaMismatchError as error:
                raise DatabaseWriteError(f"{self.out}: {error}") from None
            finally:
                self._remove_temporary()
        logger.info(
            "wrote %d features and %d examples",
            len(records.features.feature_index),
            sum(len(positions) for positions in records.examples.position),
        )

    @contextlib.contextmanager
    def _directory_lock(self) -> Iterator[None]:
        """An exclusive lock on the output's directory, held from copy to rename: no lock file
        to leave behind, and released by the system if the process dies."""
        descriptor = os.open(self.out.parent, os.O_RDONLY)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.warning(
                    "another build is writing into %s; waiting for it to finish", self.out.parent
                )
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # releases the lock

    def _remove_stale_temporaries(self) -> None:
        """Temporary files of builds that died: with the lock held, no living build has one."""
        pattern = f"{TEMPORARY_PREFIX}{self.out.name}.*.tmp*"
        for stale in self.out.parent.glob(pattern):
            logger.info("removing %s, left by a build that did not finish", stale.name)
            stale.unlink(missing_ok=True)

    def _prepare_temporary(self):
        """The temporary copy of the file as it is now (or a new file), ready for the SAE."""
        existed = self.out.exists()
        if existed:
            self._copy_existing()
        else:
            self.temporary.touch()
        engine = writable_engine(self.temporary)
        if existed:
            check_schema_version(engine)
        Base.metadata.create_all(engine)
        if not existed:
            with Session(engine) as session:
                session.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                session.commit()
        self._make_room(engine)
        return engine

    def _copy_existing(self) -> None:
        source = connect_readonly(self.out)
        target = sqlite3.connect(self.temporary)
        try:
            source.backup(target)
        except sqlite3.DatabaseError as error:
            if error.sqlite_errorname == "SQLITE_NOTADB":
                raise DatabaseWriteError(
                    f"{self.out} is not a saescope database: {error}"
                ) from None
            raise
        finally:
            source.close()
            target.close()

    def _make_room(self, engine) -> None:
        """Removes the SAE of the same name when replacing it; another build may have added one
        since the check on entry."""
        with Session(engine) as session:
            existing = session.scalar(select(Sae).where(Sae.name == self.name))
            if existing is None:
                return
            if not self.replace:
                raise DatabaseWriteError(self._name_taken())
            for table in (FeatureExamples, Feature, TokenStat, TokenLatent):
                session.execute(delete(table).where(table.sae_id == existing.id))
            session.delete(existing)
            session.commit()

    def _insert(self, engine, corpus: CorpusRecord, records: SaeRecords) -> None:
        with Session(engine) as session:
            corpus_id = self._corpus_id(session, corpus)
            sae = Sae(**asdict(records.sae), name=self.name, corpus_id=corpus_id)
            session.add(sae)
            session.flush()
            for model, columns in (
                (Feature, records.features),
                (FeatureExamples, records.examples),
                (TokenStat, records.token_stats),
                (TokenLatent, records.token_latents),
            ):
                _insert_columns(session, model, columns, sae_id=sae.id)
            session.commit()

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
        return row.id

    def _remove_temporary(self) -> None:
        for path in (self.temporary, Path(f"{self.temporary}-journal")):
            path.unlink(missing_ok=True)


def _sync(path: Path) -> None:
    """Flushes a file (or a directory's entries) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
