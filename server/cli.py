"""The `serve` command; also `python -m saescope.server`, which needs none of the pipeline's
dependencies. Its options are the server's settings (`Settings`), besides where to listen.

Every error a user can fix, click's own usage errors included, ends as one line `error: …` on
stderr with exit status 2 (`ErrorContract`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from saescope.server.settings import Settings

# Larger request heads are cut off by the HTTP parser with a bare 400.
MAX_REQUEST_HEAD_BYTES = 64 << 10

host_option = click.option("--host", default="127.0.0.1", help="Interface to listen on.")
port_option = click.option(
    "--port",
    default=8000,
    type=click.IntRange(0, 65535),
    help="Port to listen on (0: any free one).",
)


class ErrorContract:
    """For a click command or group: usage errors (an unknown option, a value of the wrong type)
    end as `error: …` with status 2, as saescope's own errors do, not as click's usage text."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as error:
            click.echo(f"error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(130)
        if standalone_mode:
            sys.exit(code if isinstance(code, int) else 0)
        return code


class Command(ErrorContract, click.Command):
    pass


def _setting_options(command):
    """An option per server setting but the database, defaulting to its environment variable."""
    for name, field in reversed(Settings.model_fields.items()):
        if name == "database":
            continue
        help_text = (
            f"{field.description[0].upper()}{field.description[1:]} "
            f"(default {field.default}, or SAESCOPE_{name.upper()})."
        )
        kind = str if field.default is None else type(field.default)
        command = click.option(
            f"--{name.replace('_', '-')}", name, type=kind, default=None, help=help_text
        )(command)
    return command


@click.command(cls=Command)
@click.argument("database", type=click.Path(path_type=Path), required=False)
@host_option
@port_option
@_setting_options
def serve(database: Path | None, host: str, port: int, **settings: Any) -> None:
    """Serve the dashboard and the JSON API for DATABASE (default: SAESCOPE_DATABASE),
    read-only."""
    run(database, host, port, **settings)


def run(database: Path | None, host: str, port: int, **settings: Any) -> None:
    """Serves `database`; settings left None come from the environment or their defaults."""
    import uvicorn

    from saescope.db.engine import SchemaMismatchError
    from saescope.server.app import create_app

    given = {name: value for name, value in settings.items() if value is not None}
    if "allowed_hosts" not in given and not os.environ.get("SAESCOPE_ALLOWED_HOSTS"):
        given["allowed_hosts"] = ",".join(dict.fromkeys([host, "localhost", "127.0.0.1"]))
    if database is not None:
        given["database"] = database
    try:
        configured = Settings(**given)
    except ValidationError as error:
        click.echo(f"error: {_describe(error)}", err=True)
        raise SystemExit(2) from None
    try:
        app = create_app(configured)
    except OSError as error:
        click.echo(f"error: {error}", err=True)
        raise SystemExit(2) from None
    except SchemaMismatchError as error:
        click.echo(f"error: {configured.database}: {error}", err=True)
        raise SystemExit(2) from None
    click.echo(f"saescope: serving {configured.database} at http://{host}:{port}/", err=True)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        # Request heads up to this size reach the app, which refuses a long URL with 414.
        h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES,
        server_header=False,
    )


def _describe(error: ValidationError) -> str:
    """A settings error in the terms the user gave it: the option and its variable."""
    problems = []
    for item in error.errors():
        name = str(item["loc"][0]) if item["loc"] else "settings"
        if item["type"] == "missing" and name == "database":
            problems.append("give the DATABASE to serve, or set SAESCOPE_DATABASE")
        else:
            flag = f"--{name.replace('_', '-')}"
            problems.append(f"{flag} / SAESCOPE_{name.upper()}: {item['msg']}")
    return "; ".join(problems)
