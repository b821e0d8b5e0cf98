"""How arrays are stored: every blob column is packed and unpacked here, and nowhere else.

A blob is a little-endian array; a column declares its element type (and, for the example
windows, its row shape) in its `info`, which `pack` and `unpack` read. The histogram's bin layout
and the example windows' geometry are part of the same contract.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import Column

INT32 = "<i4"
FLOAT32 = "<f4"
# Decoder rows: half precision keeps a 65k-latent SAE of GPT-2 at 100 MB; cosines to ~1e-3.
FLOAT16 = "<f2"

# Activation histograms have HISTOGRAM_BINS_PER_DECADE log-spaced bins per power of ten between
# 10**HISTOGRAM_LOG10_MIN and 10**HISTOGRAM_LOG10_MAX, plus an underflow bin (index 0) and an
# overflow bin (the last).
HISTOGRAM_LOG10_MIN = -4
HISTOGRAM_LOG10_MAX = 4
HISTOGRAM_BINS_PER_DECADE = 64
HISTOGRAM_BINS = (HISTOGRAM_LOG10_MAX - HISTOGRAM_LOG10_MIN) * HISTOGRAM_BINS_PER_DECADE + 2

# An example's window: this many tokens before and after the example's token.
WINDOW_LEFT = 12
WINDOW_RIGHT = 4
WINDOW_LENGTH = WINDOW_LEFT + WINDOW_RIGHT + 1


# Histograms of best decoder cosines between two SAEs: COSINE_BINS equal bins over [0, 1] (a
# negative best cosine counts in the first).
COSINE_BINS = 50


def cosine_edges() -> np.ndarray:
    return np.linspace(0.0, 1.0, COSINE_BINS + 1)


def blob(dtype: str, row_length: int | None = None) -> dict[str, Any]:
    """The `info` of a blob column: its element type, and for 2-D blobs the length of a row."""
    return {"dtype": dtype, "row_length": row_length}


def pack(column: Column, values: np.ndarray | None) -> bytes | None:
    """`values` as the column stores them."""
    if values is None:
        return None
    return np.ascontiguousarray(values, dtype=column.info["dtype"]).tobytes()


def unpack(column: Column, stored: bytes | None) -> np.ndarray | None:
    """The array a blob column holds (read-only, as the blob's bytes are)."""
    if stored is None:
        return None
    values = np.frombuffer(stored, dtype=column.info["dtype"])
    row_length = column.info["row_length"]
    return values if row_length is None else values.reshape(-1, row_length)


def histogram_edges() -> np.ndarray:
    """Edges of the finite histogram bins; bin 0 is below edges[0], the last bin above edges[-1]."""
    return np.logspace(HISTOGRAM_LOG10_MIN, HISTOGRAM_LOG10_MAX, HISTOGRAM_BINS - 1)
