"""The `serve` command; also `python -m saescope.server`, which needs none of the pipeline's
dependencies. Its options are the server's settings (`Settings`), besides where to listen."""

from __future__ import annotations

from pathlib import Path

import click

from saescope.server.settings import Settings

host_option = click.option("--host", default="127.0.0.1", help="Interface to listen on.")
port_option = click.option("--port", default=8000, help="Port to listen on.")


def _setting_options(command):
    """An option per server setting but the database, defaulting to its environment variable."""
    for name, field in reversed(Settings.model_fields.items()):
        if name == "database":
            continue
        help_text = (
            f"{field.description[0].upper()}{field.description[1:]} "
            f"(default {field.default}, or SAESCOPE_{name.upper()})."
        )
        command = click.option(
            f"--{name.replace('_', '-')}", name, type=type(field.default), help=help_text
        )(command)
    return command


@click.command()
@click.argument("database", type=click.Path(path_type=Path))
@host_option
@port_option
@_setting_options
def serve(database: Path, host: str, port: int, **settings: int | None) -> None:
    """Serve the dashboard and the JSON API for DATABASE, read-only."""
    run(database, host, port, **settings)


def run(database: Path, host: str, port: int, **settings: int | None) -> None:
    """Serves `database`; `settings` left None come from the environment or their defaults."""
    import uvicorn

    from saescope.db.engine import SchemaMismatchError
    from saescope.server.app import create_app

    try:
        overrides = {name: value for name, value in settings.items() if value is not None}
        app = create_app(Settings(database=database, **overrides))
    except (FileNotFoundError, SchemaMismatchError) as error:
        click.echo(f"error: {database}: {error}", err=True)
        raise SystemExit(2) from None
    click.echo(f"saescope: serving {database} at http://{host}:{port}/", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
