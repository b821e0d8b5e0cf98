"""Engines for the database file: read-only for the server, read-write for the writer."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.orm import Session

from saescope.db.models import SCHEMA_VERSION, Meta


class SchemaMismatchError(Exception):
    """The file was written by another version of saescope (or is not a saescope database)."""


def readonly_engine(path: Path) -> Engine:
    """An engine that can only read `path`; fails if the file does not exist."""
    if not path.is_file():
        raise FileNotFoundError(f"no database at {path}")
    url = f"sqlite:///file:{path.resolve()}?mode=ro&uri=true"
    # Enough pooled connections for every worker thread of the server; each request holds one.
    engine = create_engine(
        url, connect_args={"check_same_thread": False}, pool_size=8, max_overflow=64
    )
    event.listen(engine, "connect", _readonly_pragmas)
    return engine


def _readonly_pragmas(connection, _record) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA query_only = ON")
    cursor.close()


def writable_engine(path: Path) -> Engine:
    return create_engine(f"sqlite:///{path}")


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
