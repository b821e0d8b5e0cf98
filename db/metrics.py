"""The per-feature metrics: one declaration each, from which the stored column (`db.models`), the
build's record field (`db.records`), the response fields (the feature table's rows and the
feature page's header), the sort key and the feature table's column are all made.

Adding a metric is one entry here, its computation (the build's analysis fills the record field
of the same name) and its test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import Field

# One line per measure that is not a per-feature metric of its own; the API documents fields with
# it, the pages show it beside the number.
BEST_COSINE = "decoder cosine with its closest live latent of the other SAE"
SPECIFICITY = (
    "a latent's mean activation over the token's occurrences (zeros included) as a multiple of "
    "its mean over all tokens"
)
# Token search and corpus search leave dense latents out by default.
MAX_FREQUENCY = "latents firing on more than this share of all tokens are left out"


@dataclass(frozen=True)
class FeatureMetric:
    name: str
    """the column, record field, response field and sort key"""
    definition: str
    """one line: the API documents the field with it, the pages show it beside the number"""
    type: type = float
    nullable: bool = False
    """None where the feature has no value (a measure that cannot be taken)"""
    sortable: bool = False
    """indexed, and a sort key of the feature table (None sorts below every value)"""
    column: str | None = None
    """its heading in the feature table (and a field of the table's rows); None: not a column"""
    column_format: str = "{:.3g}"
    label: str | None = None
    """its label in the feature page's header (and a field of the feature's JSON); None: not
    shown there"""
    label_format: str = "{:.4g}"

    def cell(self, value: float | None) -> str:
        """The value as the feature table shows it."""
        return "n/a" if value is None else self.column_format.format(value)

    def header(self, value: float | None) -> str:
        """The value as the feature page's header shows it."""
        return "n/a" if value is None else self.label_format.format(value)


METRICS = (
    FeatureMetric(
        "count", "tokens of the corpus (special tokens aside) where the latent fires", int,
        label="fires on", label_format="{:,} tokens",
    ),
    FeatureMetric(
        "frequency",
        "share of the corpus tokens (special tokens aside) where the latent fires",
        sortable=True, column="frequency", label="frequency",
    ),
    FeatureMetric(
        "mean_activation", "mean activation where the latent fires",
        column="mean act.", label="mean activation",
    ),
    FeatureMetric(
        "max_activation", "highest activation on the corpus",
        sortable=True, column="max act.", label="max",
    ),
    FeatureMetric("min_activation", "lowest positive activation on the corpus"),
    FeatureMetric("bos_count", "firings on BOS and other special tokens", int),
    FeatureMetric(
        "bos_share", "share of its firings that are on BOS and other special tokens",
        label="BOS share", label_format="{:.0%}",
    ),
    FeatureMetric(
        "positional_r2", "share of its activation variance that token position explains (R²)",
        label="position R²", label_format="{:.2f}",
    ),
    FeatureMetric(
        "jaccard",
        "overlap (Jaccard) of the positions of its top activations and of its top "
        "decoder-direction projections (null: it never fires)",
        nullable=True, sortable=True, column="Jaccard", column_format="{:.2f}",
    ),
    FeatureMetric(
        "miss_rate",
        "share of its top decoder-direction projections where the latent stays at zero (null: "
        "it never fires)",
        nullable=True, sortable=True, column="miss rate", column_format="{:.2f}",
    ),
    FeatureMetric(
        "absorption",
        "share of the strong writes along its decoder direction that other latents make where "
        "it stays off (null: not measurable, see absorption_reason)",
        nullable=True, sortable=True, column="absorption", column_format="{:.2f}",
    ),
    FeatureMetric(
        "absorption_low", "lower end of the 95% bootstrap interval of absorption", nullable=True
    ),
    FeatureMetric(
        "absorption_high", "upper end of the 95% bootstrap interval of absorption", nullable=True
    ),
    FeatureMetric(
        "absorbed_positions",
        "sampled positions where the latent is off and other latents write its direction at "
        "least as strongly as it does at a typical firing",
        int,
    ),
    FeatureMetric(
        "decoder_auroc",
        "how well its decoder projection singles out where it fires: AUROC, its firings against "
        "positions where neither it nor a close latent fires (null: it never fires in the sample)",
        nullable=True,
    ),
    FeatureMetric(
        "description_length_bits",
        "bits per token to send whether it fires and, where it does, its activation at the SAE's "
        "precision: H(p) + p·H(quantised activations)",
        sortable=True, column="bits", column_format="{:.3f}",
        label="description length", label_format="{:.3f} bits/token",
    ),
)  # fmt: skip

METRICS_BY_NAME = {metric.name: metric for metric in METRICS}
TABLE_COLUMNS = tuple(metric for metric in METRICS if metric.column is not None)
HEADER_METRICS = tuple(metric for metric in METRICS if metric.label is not None)
SORTABLE = tuple(metric for metric in METRICS if metric.sortable)
# One line per measure, by name: the metrics' and the others'.
DEFINITIONS = {metric.name: metric.definition for metric in METRICS} | {
    "best_cosine": BEST_COSINE,
    "specificity": SPECIFICITY,
}


def response_fields(metrics: tuple[FeatureMetric, ...]) -> dict[str, Any]:
    """The metrics as fields of a response model (`pydantic.create_model`), documented."""
    return {
        metric.name: (
            metric.type | None if metric.nullable else metric.type,
            Field(description=metric.definition),
        )
        for metric in metrics
    }
