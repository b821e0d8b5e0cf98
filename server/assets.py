"""The static files the pages load: where each lives, and the version its URL carries, so that a
browser may keep it for a year (a changed file gets a new URL)."""

from __future__ import annotations

import hashlib
from functools import cache
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

import swagger_ui_bundle

STATIC_DIR = files("saescope.frontend") / "static"
SWAGGER_DIR = Path(swagger_ui_bundle.swagger_ui_path)
SWAGGER_PREFIX = "swagger/"


def asset(name: str) -> Traversable:
    """The file behind /static/`name`."""
    if name.startswith(SWAGGER_PREFIX):
        return SWAGGER_DIR / name.removeprefix(SWAGGER_PREFIX)
    return STATIC_DIR / name


@cache
def version(name: str) -> str:
    """A digest of the file's content."""
    return hashlib.sha256(asset(name).read_bytes()).hexdigest()[:12]
