"""The import arrows the README states, every one checked: pipeline → db ← server, the command
line on top, and the seams inside the pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGES = ("cli", "db", "server", "frontend", "pipeline")
LANGUAGE_MODEL_LIBRARIES = ("torch", "numba", "transformer_lens", "sae_lens", "transformers")

# (importer, imported): no module under the first prefix may import one under the second.
FORBIDDEN = [
    *((layer, "saescope.cli") for layer in ("saescope.db", "saescope.server", "saescope.pipeline")),
    ("saescope.db", "saescope.pipeline"),
    ("saescope.db", "saescope.server"),
    ("saescope.server", "saescope.pipeline"),
    ("saescope.pipeline", "saescope.server"),
    *(("saescope.db", library) for library in LANGUAGE_MODEL_LIBRARIES),
    *(("saescope.server", library) for library in LANGUAGE_MODEL_LIBRARIES),
    # The four products inside the pipeline: the build, training and the synthetic lab do not
    # reach into each other or into the demo, which uses them all.
    ("saescope.pipeline.precompute", "saescope.pipeline.training"),
    ("saescope.pipeline.precompute", "saescope.pipeline.demo"),
    ("saescope.pipeline.training", "saescope.pipeline.precompute"),
    ("saescope.pipeline.training", "saescope.pipeline.demo"),
    ("saescope.pipeline.synthetic", "saescope.pipeline.precompute"),
    ("saescope.pipeline.synthetic", "saescope.pipeline.training"),
    ("saescope.pipeline.synthetic", "saescope.pipeline.demo"),
]
# Only the build job writes: the analysis hands it records, never packs storage itself.
WRITERS = {"saescope.pipeline.precompute.job"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["saescope", *parts])


def imports_of(module: str, source: str, is_package: bool) -> list[str]:
    """Every module that `source`, the text of `module`, imports, at any depth (lazy imports
    included), with relative imports resolved."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            # `from package import module` imports the module too.
            found += [module, *(f"{module}.{alias.name}" for alias in node.names)]
    return found


def import_edges() -> list[tuple[str, str]]:
    return [
        (module_name(path), imported)
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for imported in imports_of(module_name(path), path.read_text(), path.name == "__init__.py")
    ]


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(edges: list[tuple[str, str]]) -> list[str]:
    found = [
        f"{importer} imports {imported} ({low} must not import {high})"
        for importer, imported in edges
        for low, high in FORBIDDEN
        if under(importer, low) and under(imported, high)
    ]
    found += [
        f"{importer} imports {imported} (only {', '.join(sorted(WRITERS))} writes)"
        for importer, imported in edges
        if under(importer, "saescope.pipeline")
        and importer not in WRITERS
        and under(imported, "saescope.db.writer")
    ]
    found += [
        f"{importer} imports {imported}: a generic top-level name, not under saescope"
        for importer, imported in edges
        if imported.split(".")[0] in PACKAGES
    ]
    return found


def test_every_forbidden_arrow_is_absent() -> None:
    assert violations(import_edges()) == []


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("saescope.pipeline.precompute.job", "saescope.server.app"),
        ("saescope.pipeline.precompute.analysis", "saescope.db.writer"),
        ("saescope.pipeline.precompute.job", "saescope.pipeline.training.train"),
        ("saescope.server.api", "torch"),
        ("saescope.db.queries.feature_table", "saescope.pipeline"),
        ("saescope.server.views", "db.queries"),
    ],
)
def test_a_forbidden_arrow_is_caught(importer: str, imported: str) -> None:
    assert violations([(importer, imported)])


def test_relative_imports_are_resolved() -> None:
    source = "from ..db import queries\nfrom . import views\n"
    assert imports_of("saescope.server.api", source, is_package=False) == [
        "saescope.db",
        "saescope.db.queries",
        "saescope.server",
        "saescope.server.views",
    ]
    assert imports_of("saescope.server", "from .api import router\n", is_package=True) == [
        "saescope.server.api",
        "saescope.server.api.router",
    ]
