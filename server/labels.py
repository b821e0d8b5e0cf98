"""Labels and notes on latents: what a researcher writes down about what a latent means.

They live in a separate writable SQLite file (`SAESCOPE_LABELS`, by default beside the database
as `NAME.labels.sqlite`), never in the read-only features database. Anyone can read them; writes
need the token the server was started with (`SAESCOPE_WRITE_TOKEN`, sent as
`Authorization: Bearer TOKEN`); without one configured, labels are read-only.
"""

from __future__ import annotations

import hmac
import os
import sqlite3
import threading
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from saescope.db.engine import connect_readonly, like_containing

SCHEMA = """
create table if not exists labels (
    sae text not null,
    feature_index integer not null,
    label text not null,
    note text not null default '',
    author text not null default '',
    updated_at text not null,
    primary key (sae, feature_index)
)
"""
MAX_LABEL = 200
MAX_NOTE = 10_000


class LabelIn(BaseModel):
    label: str = Field(min_length=1, max_length=MAX_LABEL, description="what the latent means")
    note: str = Field("", max_length=MAX_NOTE, description="longer notes: evidence, doubts")
    author: str = Field("", max_length=100)


class Label(LabelIn):
    sae: str
    feature_index: int
    updated_at: str = Field(description="when it was last written (UTC, ISO 8601)")


class LabelImport(LabelIn):
    feature_index: int = Field(ge=0)


def labels_path(database: Path) -> Path:
    """Where the labels of `database` live unless SAESCOPE_LABELS says otherwise."""
    return database.with_name(database.name + ".labels.sqlite")


# Seconds a write waits for another process's lock on the labels file before a 503.
LOCK_WAIT_SECONDS = 2.0
# What a 503 for a busy labels file asks the client to wait.
RETRY_AFTER_SECONDS = 2


class LabelsUnavailable(Exception):
    """The labels file is locked by another process, or cannot be read: a 503."""


class LabelStore:
    """The labels file: read on every request (it may be missing: no labels yet), written only
    with the token."""

    def __init__(self, path: Path, write_token: str | None) -> None:
        self.path = path
        self.write_token = write_token
        self._write_lock = threading.Lock()

    def check_token(self, authorization: str | None) -> None:
        if self.write_token is None:
            raise HTTPException(
                403, "labels are read-only here: start the server with SAESCOPE_WRITE_TOKEN set"
            )
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.write_token.encode()
        ):
            raise HTTPException(
                401,
                "writing labels needs the server's write token, as `Authorization: Bearer TOKEN`",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def check(self) -> None:
        """At start: an existing file must be a labels file, and where writes are allowed its
        place must be writable (OSError otherwise, which `serve` reports)."""
        if self.path.is_file():
            try:
                self._read("select * from labels limit 1", ())
            except LabelsUnavailable as error:
                raise OSError(f"labels file {self.path}: {error}") from None
        if self.write_token is not None:
            place = self.path if self.path.exists() else self.path.parent
            if not os.access(place, os.W_OK):
                raise OSError(
                    f"labels file {self.path} is not writable: give a writable place with "
                    "--labels / SAESCOPE_LABELS, or leave SAESCOPE_WRITE_TOKEN unset"
                )

    def _read(self, query: str, parameters: tuple) -> list[Label]:
        if not self.path.is_file():
            return []
        try:
            with closing(connect_readonly(self.path)) as connection:
                connection.execute(f"pragma busy_timeout = {int(LOCK_WAIT_SECONDS * 1000)}")
                connection.row_factory = sqlite3.Row
                rows = connection.execute(query, parameters).fetchall()
        except sqlite3.Error as error:
            if "no such table" in str(error):  # created but never written
                return []
            raise LabelsUnavailable(_reason(error)) from None
        return [Label(**dict(row)) for row in rows]

    def _writing(self) -> sqlite3.Connection:
        """A connection to write with, the table made if need be."""
        connection = sqlite3.connect(self.path, timeout=LOCK_WAIT_SECONDS)
        connection.execute(SCHEMA)
        return connection

    def of_sae(self, sae: str, text: str | None = None) -> list[Label]:
        """The SAE's labels by latent; with `text`, those whose label or note contains it."""
        if text:
            pattern = like_containing(text)
            return self._read(
                "select * from labels where sae = ? and (label like ? escape '\\' or note like ? "
                "escape '\\') order by feature_index",
                (sae, pattern, pattern),
            )
        return self._read("select * from labels where sae = ? order by feature_index", (sae,))

    def of_features(self, sae: str, features: list[int]) -> dict[int, Label]:
        if not features:
            return {}
        marks = ",".join("?" * len(features))
        labels = self._read(
            f"select * from labels where sae = ? and feature_index in ({marks})",
            (sae, *features),
        )
        return {label.feature_index: label for label in labels}

    def write(self, sae: str, labels: list[LabelImport]) -> list[Label]:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        rows = [(sae, x.feature_index, x.label, x.note, x.author, now) for x in labels]
        try:
            with self._write_lock, closing(self._writing()) as connection, connection:
                connection.executemany(
                    "insert or replace into labels values (?, ?, ?, ?, ?, ?)", rows
                )
        except sqlite3.Error as error:
            raise LabelsUnavailable(_reason(error)) from None
        return [Label(sae=sae, updated_at=now, **x.model_dump()) for x in labels]

    def delete(self, sae: str, feature_index: int) -> bool:
        if not self.path.is_file():
            return False
        try:
            with self._write_lock, closing(self._writing()) as connection, connection:
                deleted = connection.execute(
                    "delete from labels where sae = ? and feature_index = ?", (sae, feature_index)
                ).rowcount
        except sqlite3.Error as error:
            raise LabelsUnavailable(_reason(error)) from None
        return deleted > 0


def _reason(error: sqlite3.Error) -> str:
    if "locked" in str(error) or "busy" in str(error):
        return "the labels file is locked by another process: try again shortly"
    return f"the labels file cannot be used: {error}"
