"""Engines for the database file: read-only for the server, read-write for the writer.

Connections are made by the sqlite3 module directly (no SQLAlchemy URL to parse the file name),
with the path escaped into an SQLite URI, so any legal file name works: `p%41.db`, `a#b.db`.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event, inspect, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool, QueuePool

from saescope.db.models import SCHEMA_VERSION, Base, Meta


class SchemaMismatchError(Exception):
    """The file was written by another version of saescope (or is not a saescope database)."""


class DatabaseUnavailable(Exception):
    """The served database file is missing, unreadable or of another schema."""


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A connection that can only read `path` and never creates it."""
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    return sqlite3.connect(uri, uri=True, check_same_thread=False)


def like_containing(text: str) -> str:
    """A LIKE pattern (with `escape '\\'`) that matches text containing `text` as it is."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def readonly_engine(path: Path) -> Engine:
    """An engine that can only read `path`; fails if the file does not exist."""
    if not path.is_file():
        raise FileNotFoundError(f"no database at {path}")
    # Enough pooled connections for every worker thread of the server; each request holds one.
    engine = create_engine(
        "sqlite://",
        creator=lambda: connect_readonly(path),
        poolclass=QueuePool,
        pool_size=8,
        max_overflow=64,
    )
    event.listen(engine, "connect", _readonly_pragmas)
    return engine


def _readonly_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA query_only = ON")
    cursor.close()


def writable_engine(path: Path) -> Engine:
    return create_engine("sqlite://", creator=lambda: sqlite3.connect(path), poolclass=NullPool)


def check_schema_version(engine: Engine) -> None:
    """Raises SchemaMismatchError unless the file has this version's schema."""
    try:
        with Session(engine) as session:
            found = session.scalar(select(Meta.value).where(Meta.key == "schema_version"))
    except Exception as error:
        raise SchemaMismatchError(f"not a saescope database ({error.__class__.__name__})") from None
    if found != str(SCHEMA_VERSION):
        raise SchemaMismatchError(
            f"database schema version {found}, this saescope reads version {SCHEMA_VERSION}; "
            "rebuild the database with `saescope build`"
        )
    # A table or column added (a new metric, `db.metrics`) is caught without a version bump.
    tables = inspect(engine)
    for table in Base.metadata.sorted_tables:
        if not tables.has_table(table.name):
            raise SchemaMismatchError(
                f"the database has no {table.name} table: it was written by an older saescope; "
                "rebuild the database with `saescope build`"
            )
        stored = {column["name"] for column in tables.get_columns(table.name)}
        missing = sorted(set(table.columns.keys()) - stored)
        if missing:
            raise SchemaMismatchError(
                f"the database's {table.name} table has no {', '.join(missing)}: it was written "
                "by an older saescope; rebuild the database with `saescope build`"
            )


def has_current_schema(path: Path) -> bool:
    """Whether the file at `path` is a saescope database with this version's schema."""
    engine = readonly_engine(path)
    try:
        check_schema_version(engine)
    except SchemaMismatchError:
        return False
    finally:
        engine.dispose()
    return True


# A file rewritten in place (same inode) is read again once it has stayed unchanged this long.
SETTLE_SECONDS = 1.0
SQLITE_HEADER = b"SQLite format 3\x00"


class ServedDatabase:
    """The file a server serves, one consistent database at a time.

    Builds replace a database by renaming a new file into place. Each request asks for the
    current engine: when the file at the path is another one than the engine reads, a new engine
    is opened (and every cache keyed by the engine goes with the old one); a missing file, or one
    saescope cannot read, raises DatabaseUnavailable until a readable one is back. A file
    overwritten in place (the same inode, another size or time) is unavailable until it has
    stayed unchanged for SETTLE_SECONDS and starts with SQLite's header: the writer may not be
    done.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._identity: tuple[int, ...] | None = None
        self._rewritten: tuple[tuple[int, ...], float] | None = None
        """the identity an in-place rewrite was last seen with, and since when"""
        if not path.is_file():
            raise FileNotFoundError(f"no database at {path}")
        self._open(self._identify())  # the first file must be readable: raised as it is

    def _identify(self) -> tuple[int, ...]:
        stat = os.stat(self.path)
        return stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size

    def _open(self, identity: tuple[int, ...]) -> Engine:
        engine = readonly_engine(self.path)
        try:
            check_schema_version(engine)
        except SchemaMismatchError:
            engine.dispose()
            raise
        previous, self._engine, self._identity = self._engine, engine, identity
        if previous is not None:
            previous.dispose()  # connections still in use close when they are returned
        return engine

    def engine(self) -> Engine:
        try:
            identity = self._identify()
        except OSError as error:
            raise DatabaseUnavailable(f"no database at {self.path} ({error.strerror})") from None
        if identity == self._identity:
            return self._engine
        with self._lock:
            if identity == self._identity:
                return self._engine
            if self._identity is not None and identity[:2] == self._identity[:2]:
                self._wait_for_rewrite(identity)
            try:
                return self._open(identity)
            except (OSError, SchemaMismatchError) as error:
                raise DatabaseUnavailable(f"{self.path}: {error}") from None

    def _wait_for_rewrite(self, identity: tuple[int, ...]) -> None:
        """DatabaseUnavailable while the file rewritten in place may still be being written."""
        now = time.monotonic()
        if self._rewritten is None or self._rewritten[0] != identity:
            self._rewritten = identity, now
        with open(self.path, "rb") as file:
            whole = file.read(len(SQLITE_HEADER)) == SQLITE_HEADER
        if not whole or now - self._rewritten[1] < SETTLE_SECONDS:
            raise DatabaseUnavailable(
                f"{self.path} is being overwritten in place: replace a database by renaming a "
                "whole file into place"
            )

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
