"""Labels and notes on latents: what a researcher writes down about what a latent means.

They live in a separate writable SQLite file (`SAESCOPE_LABELS`, by default beside the database
as `NAME.labels.sqlite`), never in the read-only features database. Anyone can read them; writes
need the token the server was started with (`SAESCOPE_WRITE_TOKEN`, sent as
`Authorization: Bearer TOKEN`); without one configured, labels are read-only.
"""

from __future__ import annotations

import hmac
import sqlite3
import threading
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from saescope.db.engine import connect_readonly

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

    def _read(self, query: str, parameters: tuple) -> list[Label]:
        if not self.path.is_file():
            return []
        with closing(connect_readonly(self.path)) as connection:
            connection.row_factory = sqlite3.Row
            try:
                rows = connection.execute(query, parameters).fetchall()
            except sqlite3.OperationalError:  # created but empty
                return []
        return [Label(**dict(row)) for row in rows]

    def of_sae(self, sae: str, text: str | None = None) -> list[Label]:
        """The SAE's labels by latent; with `text`, those whose label or note contains it."""
        if text:
            pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
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
        with self._write_lock, closing(sqlite3.connect(self.path)) as connection:
            connection.execute(SCHEMA)
            with connection:
                connection.executemany(
                    "insert or replace into labels values (?, ?, ?, ?, ?, ?)", rows
                )
        return [Label(sae=sae, updated_at=now, **x.model_dump()) for x in labels]

    def delete(self, sae: str, feature_index: int) -> bool:
        if not self.path.is_file():
            return False
        with self._write_lock, closing(sqlite3.connect(self.path)) as connection:
            connection.execute(SCHEMA)
            with connection:
                deleted = connection.execute(
                    "delete from labels where sae = ? and feature_index = ?", (sae, feature_index)
                ).rowcount
        return deleted > 0
