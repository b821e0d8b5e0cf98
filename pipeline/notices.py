"""Library notices that say nothing to a user of saescope."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def sparse_beta_notice_silenced() -> Iterator[None]:
    """torch's notice, on first use of a sparse tensor, that its sparse tensors are in beta."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse", category=UserWarning)
        yield
