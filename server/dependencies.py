"""Request-scoped dependencies."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from saescope.server.settings import Settings


def get_session(request: Request) -> Iterator[Session]:
    """A session on the database file as it is now (see `ServedDatabase`)."""
    with Session(request.app.state.database.engine()) as session:
        yield session


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
