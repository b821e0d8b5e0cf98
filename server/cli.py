"""The `serve` command; also reachable as `python -m server` in an image without torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def serve(
    database: Annotated[Path, typer.Argument(help="Database file written by `saescope build`.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    page_size: Annotated[
        int | None,
        typer.Option(
            help="Features per page of the feature table (default 50, or SAESCOPE_PAGE_SIZE)."
        ),
    ] = None,
) -> None:
    """Serve the dashboard and the JSON API for DATABASE, read-only."""
    import uvicorn

    from saescope.db.engine import SchemaMismatchError
    from saescope.server.app import create_app
    from saescope.server.settings import Settings

    try:
        overrides = {"page_size": page_size} if page_size is not None else {}
        app = create_app(Settings(database=database, **overrides))
    except (FileNotFoundError, SchemaMismatchError) as error:
        typer.echo(f"error: {database}: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"saescope: serving {database} at http://{host}:{port}/", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def main() -> None:
    typer.run(serve)
