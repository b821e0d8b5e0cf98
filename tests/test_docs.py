"""The README is the user's manual: its CLI reference, API routes and settings match the code."""

from __future__ import annotations

from pathlib import Path

import click

from saescope.cli import app
from saescope.db.flags import FLAGS
from saescope.server.settings import Settings

README = (Path(__file__).parent.parent / "README.md").read_text()
COMMANDS = (
    "build", "compare", "train", "train-lm", "synth", "demo", "serve", "infer", "export",
    "import-labels", "import-results", "explain",
)  # fmt: skip


def option_table(command_name: str) -> str:
    """The README's table for one command, generated from its options' help."""
    command = app.commands[command_name]
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for parameter in command.params:
        if isinstance(parameter, click.Argument):
            name, default = parameter.human_readable_name, "(required)"
        else:
            name = " / ".join(f"`{opt}`" for opt in parameter.opts + parameter.secondary_opts)
            if parameter.required:
                default = "(required)"
            elif parameter.default is None:
                default = ""
            else:
                default = f"`{parameter.default}`"
        rows.append(f"| {name} | {default} | {(parameter.help or '').replace('|', '/')} |")
    return "\n".join(rows)


def test_readme_documents_every_command_option() -> None:
    for name in COMMANDS:
        table = option_table(name)
        assert table in README, f"README's table for `saescope {name}` is out of date:\n{table}"


def flag_table() -> str:
    """The README's table of flags, generated from their definitions."""
    rows = ["| flag | rule |", "|---|---|"]
    rows += [f"| {flag.label} | {flag.definition} |" for flag in FLAGS]
    return "\n".join(rows)


def test_readme_states_every_flag_rule() -> None:
    assert flag_table() in README, f"README's table of flags is out of date:\n{flag_table()}"


def test_readme_documents_every_setting() -> None:
    for name, field in Settings.model_fields.items():
        assert f"`SAESCOPE_{name.upper()}`" in README, name
        assert field.description in README, name


def test_readme_lists_every_api_route() -> None:
    from saescope.server import api

    for route in api.router.routes:
        for method in route.methods - {"HEAD"}:
            assert f"{method} {route.path}" in README, route.path


def test_compose_file_is_accepted() -> None:
    import shutil
    import subprocess

    import pytest

    root = Path(__file__).parent.parent
    if shutil.which("docker-compose"):
        command = ["docker-compose", "config", "--quiet"]
    elif (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        command = ["docker", "compose", "config", "--quiet"]
    else:
        pytest.skip("no docker compose client on this machine")
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
