"""The flags a feature can carry: one definition each, which the analysis, the queries, the
templates, the API and the README all read.

A flag is a conjunction of comparisons on stored feature columns, so the same definition is
evaluated on the analysis's arrays (`mask`), on a stored row (`holds`) and in SQL (the query
layer). Adding a flag is one entry here, plus the computation of any column it reads.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

COMPARISONS: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq,
    ">": operator.gt,
    ">=": operator.ge,
}


@dataclass(frozen=True)
class Condition:
    """`column <comparison> threshold`; a `threshold` of None is the flag's adjustable one."""

    column: str
    comparison: str
    threshold: float | None = None


@dataclass(frozen=True)
class FlagDefinition:
    name: str
    rule: str
    """the rule in words, as the API and the pages state it; `{threshold}` is the adjustable one"""
    definition: str
    """the rule as the README states it, with its formula"""
    reason: str
    """why a feature carries the flag, formatted with its columns and `threshold`"""
    conditions: tuple[Condition, ...]
    ranked_by: str
    """column by which flagged features are listed, most extreme first"""
    descending: bool = True
    default_threshold: float | None = None
    """the adjustable threshold's default, for a flag whose conditions have one"""
    shown_as: str | None = None
    """its name on the pages, where it is not the API name's words"""
    measured_by: str | None = None
    """the column its measure fills only where it can be taken (None: every latent's)"""

    @property
    def label(self) -> str:
        return self.shown_as or self.name.replace("_", " ")

    def threshold_of(self, condition: Condition, threshold: float | None) -> float:
        if condition.threshold is not None:
            return condition.threshold
        return self.default_threshold if threshold is None else threshold

    def mask(self, columns: Mapping[str, np.ndarray], threshold: float | None = None) -> np.ndarray:
        """Which features carry the flag, from arrays of their columns (NaN compares false)."""
        held = np.ones(len(next(iter(columns.values()))), dtype=bool)
        for condition in self.conditions:
            compare = COMPARISONS[condition.comparison]
            with np.errstate(invalid="ignore"):
                held &= compare(columns[condition.column], self.threshold_of(condition, threshold))
        return held

    def holds(self, row: Any, threshold: float | None = None) -> bool:
        """Whether a stored feature row carries the flag (a NULL column compares false)."""
        for condition in self.conditions:
            value = getattr(row, condition.column)
            if value is None or not COMPARISONS[condition.comparison](
                value, self.threshold_of(condition, threshold)
            ):
                return False
        return True

    def explain(self, row: Any, threshold: float | None = None) -> str:
        return self.reason.format_map(_Columns(row, threshold))


class _Columns:
    """A stored row's columns by name, and `threshold`, for `str.format_map`."""

    def __init__(self, row: Any, threshold: float | None) -> None:
        self.row = row
        self.threshold = threshold

    def __getitem__(self, key: str) -> Any:
        return self.threshold if key == "threshold" else getattr(self.row, key)


HIGH_FREQUENCY = FlagDefinition(
    name="high_frequency",
    rule="fires on more than {threshold:.0%} of tokens",
    definition="frequency > `--high-frequency-threshold` (default 0.1); the flags page takes any "
    "threshold",
    reason="fires on {frequency:.1%} of tokens (threshold {threshold:.0%})",
    conditions=(Condition("frequency", ">"),),
    ranked_by="frequency",
    default_threshold=0.1,
    shown_as="dense",
)

FLAGS = (
    FlagDefinition(
        name="dead",
        rule="never active on the corpus tokens (special tokens aside); it carries no other flag",
        definition="never active on the corpus tokens (special tokens aside: a latent that fires "
        "only on BOS is dead); a dead latent carries no other flag",
        reason="never fired on the corpus tokens",
        conditions=(Condition("count", "==", 0),),
        ranked_by="feature_index",
        descending=False,
    ),
    HIGH_FREQUENCY,
    FlagDefinition(
        name="positional",
        rule="position explains more than half of the activation variance (R² > 0.5)",
        definition="position explains more than half of the activation's variance: "
        "R² = Σ_p n_p (m_p − m)² / Σ_t (f_t − m)² > 0.5, with m_p the mean activation (zeros "
        "included) at position p over its n_p tokens",
        reason="position explains {positional_r2:.0%} of its activation variance",
        conditions=(Condition("count", ">", 0), Condition("positional_r2", ">", 0.5)),
        ranked_by="positional_r2",
    ),
    FlagDefinition(
        name="bos_dominated",
        rule="more than half of its firings are on BOS/special tokens",
        definition="more than half of its firings are on BOS/special tokens",
        reason="{bos_share:.0%} of its firings are on BOS/special tokens",
        conditions=(Condition("count", ">", 0), Condition("bos_share", ">", 0.5)),
        ranked_by="bos_share",
    ),
    FlagDefinition(
        name="absorbed",
        rule="with 95% confidence, other latents make at least 30% of the strong writes along its "
        "decoder direction, where it stays off",
        definition="absorption measurable and its 95% interval's lower end ≥ 0.3: other latents "
        "make at least 30% of the strong writes along its decoder direction, at positions where "
        "it stays off (Chanin et al., 2024; the measure under *Absorption* below)",
        reason="other latents make {absorption:.0%} (95% interval {absorption_low:.0%} to "
        "{absorption_high:.0%}) of the strong writes along its decoder direction, where it stays "
        "off; they are listed under encoder vs decoder",
        conditions=(Condition("absorption_low", ">=", 0.3),),
        ranked_by="absorption",
        measured_by="absorption",
    ),
)

FLAGS_BY_NAME = {flag.name: flag for flag in FLAGS}

FlagName = StrEnum("FlagName", [flag.name for flag in FLAGS])
