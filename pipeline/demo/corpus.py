"""The demo corpus: text every Python installation ships, so nothing is downloaded.

Docstrings of the standard library's modules, classes and functions (read with `ast`, never
imported), and the `pydoc_data` help topics. Documents come in a fixed order; every tenth is
held out, so the demo language model and SAE never see the text the demo database shows.
"""

from __future__ import annotations

import ast
import sysconfig
from collections.abc import Iterator
from pathlib import Path

HELD_OUT_EVERY = 10
_SKIPPED_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        path
        for path in root.rglob("*.py")
        if not _SKIPPED_PARTS.intersection(path.relative_to(root).parts)
    )


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            docstring = ast.get_docstring(node)
            if docstring and len(docstring) >= 40:
                yield docstring


def documents() -> Iterator[str]:
    """Every document of the corpus, in a fixed order."""
    from pydoc_data.topics import topics

    for path in _stdlib_files():
        yield from _docstrings(path)
    for name in sorted(topics):
        yield topics[name]


def stdlib_texts(held_out: bool = False) -> Iterator[str]:
    """The training documents, or with `held_out` the documents kept back from training."""
    for number, text in enumerate(documents()):
        if (number % HELD_OUT_EVERY == 0) == held_out:
            yield text
