"""The one error a user can fix: raised with a message that says what to fix."""

from __future__ import annotations


class InputError(Exception):
    """A problem with the user's input; the message says what to fix."""


def describe(error: Exception) -> str:
    """A library's exception in one line: its class and the first line of its message."""
    text = str(error).strip().splitlines()
    return f"{error.__class__.__name__}: {text[0] if text else ''}"[:500]
