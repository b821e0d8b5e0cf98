"""The command line's error contract: every error a user can fix is one line `error: …` on
stderr and exit status 2, click's own usage errors and the server's settings included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from saescope.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "{db}", "--page-size", "0"], "--page-size / SAESCOPE_PAGE_SIZE"),
        (["serve", "{db}", "--page-size", "500"], "less than or equal to 200"),
        (["serve", "{db}", "--port", "99999"], "'--port': 99999 is not in the range 0<=x<=65535"),
        (["serve", "{db}", "--port", "many"], "'--port': 'many' is not a valid integer"),
        (["serve", "/no/such/file.db"], "no database at /no/such/file.db"),
        (["serve"], "give the DATABASE to serve, or set SAESCOPE_DATABASE"),
        (["build", "--out", "x.db", "--high-frequency-threshold", "2"], "at most 1"),
        (["build", "--out", "x.db", "--k-top", "many"], "'--k-top': 'many' is not a valid"),
        (["build", "--no-such-option"], "No such option '--no-such-option'"),
    ],
)
def test_user_errors_are_one_line_and_status_2(dashboard_db, args, message) -> None:
    args = [arg.format(db=dashboard_db) for arg in args]
    result = runner.invoke(app, args, env={"SAESCOPE_DATABASE": None})
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and message in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("SAESCOPE_PAGE_SIZE", "abc", "--page-size / SAESCOPE_PAGE_SIZE: Input should be a valid"),
        ("SAESCOPE_SEARCH_LIMIT", "0", "--search-limit / SAESCOPE_SEARCH_LIMIT"),
    ],
)
def test_bad_server_settings_from_the_environment(dashboard_db, variable, value, message) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "saescope.server", str(dashboard_db)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_environment(), variable: value},
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr


def test_the_database_can_come_from_the_environment(dashboard_db: Path) -> None:
    """`saescope serve` with SAESCOPE_DATABASE and no argument starts (and is stopped here)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "saescope.server", "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env={**_environment(), "SAESCOPE_DATABASE": str(dashboard_db)},
    )
    try:
        line = server.stderr.readline()
        assert f"serving {dashboard_db}" in line
    finally:
        server.terminate()
        server.wait(timeout=30)


def _environment() -> dict[str, str]:
    import os

    return {name: value for name, value in os.environ.items() if not name.startswith("SAESCOPE_")}
