"""Writes one SAE's results into a database file atomically.

The file is copied to a temporary file beside it (or created there), the new SAE is added and the
temporary file is renamed over the original: a failed or interrupted build leaves no file, or the
previous one intact.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import JSON, LargeBinary, delete, select
from sqlalchemy.orm import Session

from saescope.db import codec
from saescope.db.engine import SchemaMismatchError, check_schema_version, writable_engine
from saescope.db.models import (
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

SAE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class DatabaseWriteError(Exception):
    """The output cannot be written; the message says why."""


def _insert_columns(session: Session, model: type[Base], record: Any, **constant: Any) -> None:
    """Bulk insert of a column-wise record through the driver: one executemany, no per-row ORM
    work. Blob columns are packed by `db.codec`, JSON columns serialised here; a field left None
    is NULL in every row, and `constant` fills a column with one value in every row."""
    table = model.__table__
    length = len(getattr(record, fields(record)[0].name))
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
    """Context manager: on entry checks that `name` can be added to `out` and prepares a temporary
    copy; `write` adds the SAE; a clean exit renames the copy into place, any error removes it."""

    def __init__(self, out: Path, name: str, replace: bool = False) -> None:
        if not SAE_NAME_PATTERN.match(name):
            raise DatabaseWriteError(
                f"SAE name {name!r} must start with a letter or digit and use only "
                "letters, digits, '.', '_' and '-' (at most 128 characters)"
            )
        self.out = out
        self.name = name
        self.replace = replace
        self.temporary = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        self.engine = None

    def __enter__(self) -> DatabaseWriter:
        if not self.out.parent.is_dir():
            raise DatabaseWriteError(f"output directory {self.out.parent} does not exist")
        try:
            existed = self.out.exists()
            if existed:
                self._copy_existing()
            else:
                self.temporary.touch()
            self.engine = writable_engine(self.temporary)
            if existed:
                check_schema_version(self.engine)
            Base.metadata.create_all(self.engine)
            if not existed:
                with Session(self.engine) as session:
                    session.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                    session.commit()
            self._check_name()
        except OSError as error:
            self._discard()
            raise DatabaseWriteError(f"cannot write {self.out}: {error.strerror}") from None
        except SchemaMismatchError as error:
            self._discard()
            raise DatabaseWriteError(f"{self.out}: {error}") from None
        except BaseException:
            self._discard()
            raise
        return self

    def _copy_existing(self) -> None:
        source = sqlite3.connect(f"file:{self.out}?mode=ro", uri=True)
        target = sqlite3.connect(self.temporary)
        try:
            source.backup(target)
        except sqlite3.DatabaseError as error:
            raise DatabaseWriteError(f"{self.out} is not a saescope database: {error}") from None
        finally:
            source.close()
            target.close()

    def _check_name(self) -> None:
        with Session(self.engine) as session:
            existing = session.scalar(select(Sae).where(Sae.name == self.name))
            if existing is None:
                return
            if not self.replace:
                raise DatabaseWriteError(
                    f"{self.out} already holds an SAE named {self.name!r}; "
                    "choose another --name or pass --replace"
                )
            for table in (FeatureExamples, Feature, TokenStat, TokenLatent):
                session.execute(delete(table).where(table.sae_id == existing.id))
            session.delete(existing)
            session.commit()

    def write(self, corpus: CorpusRecord, records: SaeRecords) -> None:
        with Session(self.engine) as session:
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
        logger.info(
            "wrote %d features and %d examples",
            len(records.features.feature_index),
            sum(len(positions) for positions in records.examples.position),
        )

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

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self._discard()
            return
        self.engine.dispose()
        os.replace(self.temporary, self.out)

    def _discard(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
        self._remove_temporary()

    def _remove_temporary(self) -> None:
        for path in (self.temporary, Path(f"{self.temporary}-journal")):
            path.unlink(missing_ok=True)
