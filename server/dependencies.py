"""Request-scoped dependencies."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from saescope.db.explanations import ExplanationStore
from saescope.db.queries.saes import PATHS_RELATIVE_TO
from saescope.server.labels import LabelStore
from saescope.server.settings import Settings


def get_session(request: Request) -> Iterator[Session]:
    """A session on the database file as it is now (see `ServedDatabase`)."""
    database = request.app.state.database
    with Session(database.engine()) as session:
        session.info[PATHS_RELATIVE_TO] = str(database.path.resolve().parent)
        yield session


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_labels(request: Request) -> LabelStore:
    return request.app.state.labels


SessionDep = Annotated[Session, Depends(get_session)]
LabelsDep = Annotated[LabelStore, Depends(get_labels)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


@dataclass
class Reader:
    """What a view reads from: the database session, the server's settings, the labels and the
    explanations."""

    session: Session
    settings: Settings
    labels: LabelStore
    explanations: ExplanationStore


def get_reader(
    request: Request, session: SessionDep, settings: SettingsDep, labels: LabelsDep
) -> Reader:
    return Reader(session, settings, labels, request.app.state.explanations)


ReaderDep = Annotated[Reader, Depends(get_reader)]
