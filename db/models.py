"""SQLAlchemy typed ORM models: the data contract between the pipeline and the server.

Arrays (token ids, per-position profiles, window activations, histogram counts) are stored as
little-endian blobs whose encoding `db.codec` owns; short structured lists as JSON.
"""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import JSON, Float, ForeignKey, Index, Integer, LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from saescope.db.codec import FLOAT16, FLOAT32, INT32, WINDOW_LENGTH, blob
from saescope.db.metrics import METRICS, SORTABLE

# Bump whenever a table or column changes meaning; the server refuses other versions (and files
# that lack a column the tables declare, so an added column needs no bump).
SCHEMA_VERSION = 9
SAE_NAME_MAX_LENGTH = 128
SQL_TYPES = {float: Float, int: Integer}


class Base(DeclarativeBase):
    type_annotation_map: ClassVar = {dict[str, Any]: JSON, list[Any]: JSON}


class Meta(Base):
    """Key/value facts about the file itself (schema version)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str]


class Corpus(Base):
    """A tokenized corpus; SAEs built over the same tokens share it."""

    __tablename__ = "corpora"
    id: Mapped[int] = mapped_column(primary_key=True)
    fingerprint: Mapped[str] = mapped_column(unique=True)
    source: Mapped[str]
    tokenizer: Mapped[str]
    context_length: Mapped[int]
    n_sequences: Mapped[int]


class CorpusSequence(Base):
    """The token ids of one sequence, in the input corpus order."""

    __tablename__ = "corpus_sequences"
    corpus_id: Mapped[int] = mapped_column(ForeignKey("corpora.id"), primary_key=True)
    sequence_index: Mapped[int] = mapped_column(primary_key=True)
    token_ids: Mapped[bytes] = mapped_column(LargeBinary, info=blob(INT32))


class VocabToken(Base):
    """The display string of each token id of the corpus's tokenizer."""

    __tablename__ = "vocab"
    corpus_id: Mapped[int] = mapped_column(ForeignKey("corpora.id"), primary_key=True)
    token_id: Mapped[int] = mapped_column(primary_key=True)
    token: Mapped[str]
    special: Mapped[bool]
    __table_args__ = (Index("ix_vocab_token", "corpus_id", "token"),)


# The standard error of the metric before it, over the evaluation contexts (a jackknife).
SE = "standard error over the evaluation contexts (jackknife)"


def shown(description: str | None = None, detail: bool = False) -> dict[str, Any]:
    """The `info` of an SAE column that the API shows (`db.queries.saes`): in every SAE's
    summary, or with `detail` only in its own; documented with `description`."""
    return {"shown": "detail" if detail else "summary", "description": description}


class Sae(Base):
    """One SAE built over a corpus, with its whole-SAE metrics; the columns marked `shown` are
    the API's fields, in this order."""

    __tablename__ = "saes"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(SAE_NAME_MAX_LENGTH), unique=True, info=shown())
    corpus_id: Mapped[int] = mapped_column(ForeignKey("corpora.id"))
    model: Mapped[str] = mapped_column(info=shown())
    hook: Mapped[str] = mapped_column(info=shown())
    architecture: Mapped[str] = mapped_column(info=shown())
    d_in: Mapped[int] = mapped_column(info=shown())
    d_sae: Mapped[int] = mapped_column(info=shown())
    context_length: Mapped[int] = mapped_column(info=shown())
    tokens_seen: Mapped[int] = mapped_column(info=shown("tokens of the corpus the pass read"))
    l0: Mapped[float] = mapped_column(
        info=shown("mean active latents per token over the whole corpus (tokens_seen)")
    )
    # On the evaluation contexts (`pipeline.precompute.evaluation`), each with its standard
    # error over them (NAME_se).
    eval_tokens: Mapped[int] = mapped_column(
        info=shown("tokens of the evaluation contexts (the corpus's first), special ones aside")
    )
    eval_sequences: Mapped[int] = mapped_column(info=shown("evaluation contexts"))
    eval_l0: Mapped[float] = mapped_column(
        info=shown("mean active latents per token on the evaluation tokens")
    )
    eval_l0_se: Mapped[float | None] = mapped_column(info=shown(SE))
    mse: Mapped[float] = mapped_column(info=shown("on the evaluation tokens"))
    mse_se: Mapped[float | None] = mapped_column(info=shown(SE))
    explained_variance: Mapped[float | None] = mapped_column(info=shown("on the evaluation tokens"))
    explained_variance_se: Mapped[float | None] = mapped_column(info=shown(SE))
    # Cross-entropy needs a language model: NULL for synthetic sources.
    ce_clean: Mapped[float | None] = mapped_column(
        info=shown("on the evaluation contexts; null without a language model (synthetic data)")
    )
    ce_clean_se: Mapped[float | None] = mapped_column(info=shown(SE))
    ce_sae: Mapped[float | None] = mapped_column(info=shown())
    ce_sae_se: Mapped[float | None] = mapped_column(info=shown(SE))
    ce_zero: Mapped[float | None] = mapped_column(info=shown())
    ce_zero_se: Mapped[float | None] = mapped_column(info=shown(SE))
    ce_score: Mapped[float | None] = mapped_column(info=shown())
    ce_score_se: Mapped[float | None] = mapped_column(info=shown(SE))
    dead_count: Mapped[int] = mapped_column(info=shown())
    dense_count: Mapped[int] = mapped_column(info=shown())
    high_frequency_threshold: Mapped[float] = mapped_column(info=shown())
    # Only for synthetic sources, whose true features are known.
    mmcs: Mapped[float | None] = mapped_column(
        info=shown("synthetic data: mean over true features of the best decoder cosine")
    )
    recovered_share: Mapped[float | None] = mapped_column(
        info=shown("synthetic data: share of true features with a latent at cosine > 0.9")
    )
    # Description length (`pipeline.precompute.description_length`), and the precision it was
    # taken at: bins per decade of the activations.
    description_length_bits: Mapped[float] = mapped_column(
        info=shown(
            "bits per token to send the SAE's activations: the sum of its latents' description "
            "lengths"
        )
    )
    description_length_precision: Mapped[int] = mapped_column(
        info=shown(
            "bins per decade the activations are quantised to: the coarsest that raises the "
            "reconstruction's MSE by at most 5%"
        )
    )
    config: Mapped[dict[str, Any]] = mapped_column(info=shown(detail=True))
    # For SAEs trained by `saescope train`: {objective, hyperparameters, settings}, and its log.
    training: Mapped[dict[str, Any] | None] = mapped_column(
        info=shown("for SAEs trained by `saescope train`", detail=True)
    )
    training_log: Mapped[list[Any] | None] = mapped_column(info=shown(detail=True))
    n_sequences: Mapped[int]
    special_tokens_seen: Mapped[int]
    # What Jaccard and decoder-top miss rate are for a typical live latent of this SAE.
    jaccard_median: Mapped[float]
    miss_rate_median: Mapped[float]
    # Positions in the uniform sample the absorption measure runs on.
    sample_positions: Mapped[int]
    # Corpus tokens (special ones aside) at each position: the positional profiles' counts.
    position_tokens: Mapped[bytes] = mapped_column(LargeBinary, info=blob(INT32))
    ground_truth: Mapped[dict[str, Any] | None]
    # Threshold ablation on the evaluation contexts: the rules, each with its points.
    threshold_ablation: Mapped[list[Any]]


def _metric_columns() -> type:
    """A mixin with a column per metric of `db.metrics`."""
    return type(
        "MetricColumns",
        (),
        {
            metric.name: mapped_column(SQL_TYPES[metric.type], nullable=metric.nullable)
            for metric in METRICS
        },
    )


class Feature(_metric_columns(), Base):
    """Everything shown in a feature's header, charts and side tables: the metrics of
    `db.metrics`, and these."""

    __tablename__ = "features"
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id"), primary_key=True)
    feature_index: Mapped[int] = mapped_column(primary_key=True)
    # Absorption (`pipeline.precompute.absorption`): why it is not measurable where it is None.
    absorption_reason: Mapped[str | None]
    absorbers: Mapped[list[Any]]
    # The decoder row W_dec[i], for comparisons with other SAEs and for export.
    decoder: Mapped[bytes] = mapped_column(LargeBinary, info=blob(FLOAT16), deferred=True)
    histogram_first_bin: Mapped[int]
    # From the first to the last nonzero bin of the fine histogram (`db.codec`).
    histogram_counts: Mapped[bytes] = mapped_column(LargeBinary, info=blob(INT32))
    # One value per token position.
    position_rate: Mapped[bytes] = mapped_column(LargeBinary, info=blob(FLOAT32))
    position_mean: Mapped[bytes] = mapped_column(LargeBinary, info=blob(FLOAT32))
    quantile_edges: Mapped[list[Any]]
    quantile_mass: Mapped[list[Any]]
    logits_top: Mapped[list[Any]]
    logits_bottom: Mapped[list[Any]]
    neighbours: Mapped[list[Any]]
    # The tokens it fires on most often, and those it is most specific to
    # (`pipeline.precompute.analysis.TokenRankings`): {token_id, count, occurrences,
    # mean_activation, specificity} each.
    top_tokens: Mapped[list[Any]]
    specific_tokens: Mapped[list[Any]]
    # Only for synthetic sources: the closest true feature, and the closest sum of two.
    gt_feature: Mapped[str | None]
    gt_cosine: Mapped[float | None]
    composed_of: Mapped[list[Any] | None]
    composed_cosine: Mapped[float | None]
    # The feature table sorts by these.
    __table_args__ = tuple(
        Index(f"ix_features_{metric.name}", "sae_id", metric.name) for metric in SORTABLE
    )


class FeatureExamples(Base):
    """The examples of one kind (top, bottom, quantile or decoder_top) of a feature, best first
    (quantile: by band, then in the random sample's order), as parallel arrays: one blob per
    field, one entry per example."""

    __tablename__ = "examples"
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id"), primary_key=True)
    feature_index: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(primary_key=True)
    sequence_index: Mapped[bytes] = mapped_column(LargeBinary, info=blob(INT32))
    position: Mapped[bytes] = mapped_column(LargeBinary, info=blob(INT32))
    activation: Mapped[bytes] = mapped_column(LargeBinary, info=blob(FLOAT32))
    # Quantile examples only.
    band: Mapped[bytes | None] = mapped_column(LargeBinary, info=blob(INT32))
    # Decoder-top examples only.
    projection: Mapped[bytes | None] = mapped_column(LargeBinary, info=blob(FLOAT32))
    # [examples, WINDOW_LENGTH]: the feature's activation on the tokens from WINDOW_LEFT before
    # to WINDOW_RIGHT after the example's token; NaN outside the sequence.
    window_activations: Mapped[bytes] = mapped_column(
        LargeBinary, info=blob(FLOAT32, WINDOW_LENGTH)
    )


class SequenceExamples(Base):
    """Where an SAE's stored examples lie, by sequence: each (position, latent) that an example
    of any kind is centred on, once, ordered by position then latent; which latents the stored
    data shows firing on a context's tokens."""

    __tablename__ = "sequence_examples"
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id"), primary_key=True)
    sequence_index: Mapped[int] = mapped_column(primary_key=True)
    position: Mapped[bytes] = mapped_column(LargeBinary, info=blob(INT32))
    feature_index: Mapped[bytes] = mapped_column(LargeBinary, info=blob(INT32))
    activation: Mapped[bytes] = mapped_column(LargeBinary, info=blob(FLOAT32))


class TokenStat(Base):
    """How often a token occurs in the SAE's corpus tokens (special tokens excluded)."""

    __tablename__ = "token_stats"
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id"), primary_key=True)
    token_id: Mapped[int] = mapped_column(primary_key=True)
    count: Mapped[int]


# Latents the build keeps per token id, ranked (token search shows up to this many).
TOKEN_LATENTS = 16


class TokenLatent(Base):
    """The latents most specific to a token (`pipeline.precompute.analysis.TokenRankings`), each
    with where it fires most strongly on the token."""

    __tablename__ = "token_latents"
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id"), primary_key=True)
    token_id: Mapped[int] = mapped_column(primary_key=True)
    rank: Mapped[int] = mapped_column(primary_key=True)
    feature_index: Mapped[int]
    # Its firings on the token, their mean activation, and its specificity to the token.
    count: Mapped[int]
    mean_activation: Mapped[float]
    specificity: Mapped[float]
    # Its strongest firing on the token.
    sequence_index: Mapped[int]
    position: Mapped[int]
    activation: Mapped[float]


class Comparison(Base):
    """How an SAE's decoder directions are matched in another SAE of the file with the same input
    width: over its live latents, each one's best decoder cosine with the other's live latents."""

    __tablename__ = "comparisons"
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id"), primary_key=True)
    other_sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id"), primary_key=True)
    latents: Mapped[int]
    share_above_0_9: Mapped[float]
    share_above_0_8: Mapped[float]
    median_best_cosine: Mapped[float]
    # COSINE_BINS counts of the best cosines (`db.codec`).
    histogram_counts: Mapped[bytes] = mapped_column(LargeBinary, info=blob(INT32))
    same_model_and_hook: Mapped[bool]
    # The chance baseline (`pipeline.precompute.matching.chance_best_cosines`): the best cosines
    # that random unit decoders of the same shapes give, their median, highest and histogram;
    # and the live latents whose best cosine is above that highest.
    chance_median_best_cosine: Mapped[float]
    chance_max_cosine: Mapped[float]
    chance_histogram_counts: Mapped[bytes] = mapped_column(LargeBinary, info=blob(INT32))
    latents_above_chance: Mapped[int]


class Match(Base):
    """Each latent's closest latent of another SAE by decoder cosine."""

    __tablename__ = "matches"
    # Keyed latent first: a feature page reads its matches in every other SAE at once.
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id"), primary_key=True)
    feature_index: Mapped[int] = mapped_column(primary_key=True)
    other_sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id"), primary_key=True)
    other_feature_index: Mapped[int]
    cosine: Mapped[float]
    __table_args__ = (Index("ix_matches_cosine", "sae_id", "other_sae_id", "cosine"),)


class ExternalResult(Base):
    """Another tool's evaluation of an SAE (`saescope import-results`: SAEBench's result
    files), as that tool reported it: its metrics by group, and its details (per letter, per
    dataset) where it gives them."""

    __tablename__ = "external_results"
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id"), primary_key=True)
    tool: Mapped[str] = mapped_column(primary_key=True)
    eval_type: Mapped[str] = mapped_column(primary_key=True)
    source: Mapped[str]
    """the file it was read from (its name)"""
    evaluated_at: Mapped[str | None]
    imported_at: Mapped[str]
    metrics: Mapped[dict[str, Any]]
    """{group: {metric: value}}, null where the tool could not compute it"""
    details: Mapped[list[Any]]
    config: Mapped[dict[str, Any]]


class ExternalLatentResult(Base):
    """An external result's values for one latent (SAEBench core's per-latent statistics, its
    autointerp explanation and score)."""

    __tablename__ = "external_latent_results"
    sae_id: Mapped[int] = mapped_column(ForeignKey("saes.id"), primary_key=True)
    feature_index: Mapped[int] = mapped_column(primary_key=True)
    tool: Mapped[str] = mapped_column(primary_key=True)
    eval_type: Mapped[str] = mapped_column(primary_key=True)
    values: Mapped[dict[str, Any]]
