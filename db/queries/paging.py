"""Keyset pagination, shared by the paginated lists: a page is the rows after (or before) a
cursor made of the last row's sort value and its unique index."""

from __future__ import annotations

import math
from enum import StrEnum

from sqlalchemy import and_, or_

from saescope.db.queries.lookups import BadRequestError

# The most rows a page holds (the settings' page size and every `limit` are bounded by it).
MAX_PAGE_SIZE = 200
# Stored integers are SQLite's 64-bit ones.
INTEGER_LIMIT = 2**63


class SortOrder(StrEnum):
    asc = "asc"
    desc = "desc"


def keyset(
    query,
    column,
    index,
    order: SortOrder,
    cursor: str | None,
    sort: StrEnum,
    backward: bool = False,
):
    """`query` ordered by `column` then `index` (unique), from after the cursor; `backward`:
    from before it, in reverse order (the caller reverses the page)."""
    ascending = (order is SortOrder.asc) != backward
    if cursor is not None:
        value, last = parse_cursor(cursor, sort)
        beyond = column > value if ascending else column < value
        next_index = index < last if backward else index > last
        query = query.where(or_(beyond, and_(column == value, next_index)))
    direction = column.asc() if ascending else column.desc()
    return query.order_by(direction, index.desc() if backward else index.asc())


def cursor(value: float | int, index: int) -> str:
    """The `next_cursor` after a row: its sort value and its (unique) index."""
    return f"{value!r}:{index}"


def parse_cursor(text: str, sort: StrEnum) -> tuple[float, int]:
    """(sort value, index) of a `next_cursor`; BadRequestError for anything else, values out of
    range and not finite included."""
    value, _, index = text.rpartition(":")
    try:
        parsed = (int(value) if sort.value == "feature_index" else float(value)), int(index)
    except ValueError:
        parsed = None
    if (
        parsed is None
        or not math.isfinite(parsed[0])
        or not -INTEGER_LIMIT < parsed[0] < INTEGER_LIMIT
        or not 0 <= parsed[1] < INTEGER_LIMIT
    ):
        raise BadRequestError(f"cursor {text!r} does not belong to a table sorted by {sort.value}")
    return parsed
