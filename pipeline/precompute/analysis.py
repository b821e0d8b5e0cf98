"""From accumulated state and SAE weights to the records the database stores."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from saescope.db.codec import histogram_edges
from saescope.db.records import (
    ExampleColumns,
    FeatureColumns,
    JsonRows,
    RowSlices,
    TokenLatentColumns,
    TokenStatColumns,
)
from saescope.pipeline.config import ACTIVATION_CELLS
from saescope.pipeline.precompute import kernels
from saescope.pipeline.precompute.absorption import Absorption
from saescope.pipeline.precompute.accumulators import (
    AccumulatedResult,
    FeatureStatsResult,
    KeptExamples,
)
from saescope.pipeline.precompute.config import AnalysisSettings
from saescope.pipeline.saes import by_row_blocks, unit_rows
from saescope.pipeline.synthetic.ground_truth import GroundTruthMatch


def ranks_within_groups(sorted_groups: np.ndarray) -> np.ndarray:
    """0, 1, 2, … within each run of equal values of an array sorted by group."""
    if len(sorted_groups) == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    lengths = np.diff(np.r_[starts, len(sorted_groups)])
    return np.arange(len(sorted_groups)) - np.repeat(starts, lengths)


def interpolated_quantiles(
    histogram: Int[np.ndarray, "features bins"],
    low: Float[np.ndarray, " features"],
    high: Float[np.ndarray, " features"],
    levels: Float[np.ndarray, " levels"],
) -> Float[np.ndarray, "features levels"]:
    """Per feature, the quantiles at `levels` (each in (0, 1)) of its active values, interpolated
    geometrically inside the fine log-spaced bin that holds each; nan where it never fired."""
    n_bins = histogram.shape[1]
    finite = histogram_edges()
    cumulative = np.cumsum(histogram, axis=1)
    total = cumulative[:, -1:]
    target = total * np.asarray(levels)[None, :]
    # The bin holding each quantile: the first whose cumulative count reaches it (one level at a
    # time keeps the comparison features × bins).
    bin = np.zeros(target.shape, np.int64)
    for j in range(target.shape[1]):
        bin[:, j] = (cumulative < target[:, [j]]).sum(1)
    bin = np.minimum(bin, n_bins - 1)
    count = np.take_along_axis(histogram, bin, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):  # features that never fired
        fraction = (target - (np.take_along_axis(cumulative, bin, axis=1) - count)) / count
        low, high = low[:, None], high[:, None]
        lower = np.where(bin == 0, low, finite[bin - 1]).clip(low, high)
        upper = np.where(bin == n_bins - 1, high, finite[np.minimum(bin, n_bins - 2)]).clip(
            low, high
        )
        lower, upper = np.maximum(lower, 1e-30), np.maximum(upper, 1e-30)
        inner = lower * (upper / lower) ** fraction
    inner[total[:, 0] == 0] = np.nan
    return inner


def quantile_edges(
    histogram: Int[np.ndarray, "features bins"],
    low: Float[np.ndarray, " features"],
    high: Float[np.ndarray, " features"],
    n_bands: int,
) -> Float[np.ndarray, "features edges"]:
    """Per feature, cut points at quantiles 0, 1/n, …, 1 of its active values (the ends exact:
    min and max); nan for a feature that never fired. A feature whose active values are all
    equal has one band: its inner edges are infinite."""

    def block(histogram: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        inner = interpolated_quantiles(histogram, low, high, np.arange(1, n_bands) / n_bands)
        edges = np.concatenate([low[:, None], inner, high[:, None]], axis=1)
        edges[low == high, 1:-1] = np.inf
        edges[histogram.sum(1) == 0] = np.nan
        return edges

    return by_row_blocks(block, histogram, low, high)


def band_of(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The band of each value: how many inner edges (edges[..., 1:-1]) lie at or below it;
    `edges[..., j]` broadcasts against `values`."""
    band = np.zeros(np.broadcast_shapes(edges.shape[:-1], values.shape), np.int64)
    for j in range(1, edges.shape[-1] - 1):
        band += edges[..., j] <= values
    return band


def band_mass(
    histogram: Int[np.ndarray, "features bins"], edges: Float[np.ndarray, "features edges"]
) -> Float[np.ndarray, "features bands"]:
    """Share of each feature's summed activation in each band, from the fine histogram's bin
    centres."""
    return by_row_blocks(_band_mass, histogram, edges)


def _band_mass(
    histogram: Int[np.ndarray, "features bins"], edges: Float[np.ndarray, "features edges"]
) -> Float[np.ndarray, "features bands"]:
    n_features, n_bands = edges.shape[0], edges.shape[1] - 1
    finite = histogram_edges()
    centres = np.r_[finite[0], np.sqrt(finite[:-1] * finite[1:]), finite[-1]]
    cell = np.arange(n_features)[:, None] * n_bands + band_of(edges[:, None, :], centres)
    per_band = np.bincount(
        cell.ravel(), weights=(histogram * centres).ravel(), minlength=n_features * n_bands
    ).reshape(n_features, n_bands)
    return per_band / np.maximum(per_band.sum(1, keepdims=True), 1e-30)


def logit_effects(
    decoder: Float[Tensor, "d_sae d_in"], unembed: Float[Tensor, "d_in vocab"], n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top and bottom tokens of W_dec[i]·W_U per feature, in chunks of features."""
    top_values, top_ids, bottom_values, bottom_ids = [], [], [], []
    for start in range(0, decoder.shape[0], 1024):
        logits = decoder[start : start + 1024] @ unembed
        values, ids = logits.topk(n, dim=1)
        top_values.append(values)
        top_ids.append(ids)
        values, ids = logits.topk(n, dim=1, largest=False)
        bottom_values.append(values)
        bottom_ids.append(ids)
    return tuple(
        torch.cat(x).cpu().numpy() for x in (top_values, top_ids, bottom_values, bottom_ids)
    )


def decoder_neighbours(
    decoder: Float[Tensor, "d_sae d_in"], n: int, quiet: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The n latents with the highest decoder cosine to each latent (itself excluded)."""
    unit = unit_rows(decoder)
    n = min(n, decoder.shape[0] - 1)
    values, ids = [], []
    rows = max(1, ACTIVATION_CELLS // len(unit))
    for start in tqdm(range(0, unit.shape[0], rows), desc="decoder neighbours", disable=quiet):
        cosine = unit[start : start + rows] @ unit.T
        own = torch.arange(start, start + cosine.shape[0])
        cosine[torch.arange(cosine.shape[0]), own] = -2.0
        v, i = cosine.topk(n, dim=1)
        values.append(v)
        ids.append(i)
    return torch.cat(values).cpu().numpy(), torch.cat(ids).cpu().numpy()


@dataclass
class Statistics:
    """Each feature's firing statistics, from the accumulated counts and sums."""

    frequency: np.ndarray
    mean_activation: np.ndarray
    bos_share: np.ndarray
    positional_r2: np.ndarray

    @classmethod
    def of(cls, result: AccumulatedResult) -> Statistics:
        stats = result.stats
        n_features = len(stats.count)
        fired_anywhere = stats.count + stats.special_count
        return cls(
            frequency=stats.count / max(stats.tokens_seen, 1),
            mean_activation=np.divide(
                stats.sum, stats.count, out=np.zeros(n_features), where=stats.count > 0
            ),
            bos_share=np.divide(
                stats.special_count,
                fired_anywhere,
                out=np.zeros(n_features),
                where=fired_anywhere > 0,
            ),
            positional_r2=positional_r2(result),
        )


def positional_profile(stats: FeatureStatsResult) -> tuple[np.ndarray, np.ndarray]:
    """Per feature and position: the firing rate, and the mean activation where it fires (0
    where it never does); in float32, as they are stored."""
    position_tokens = np.maximum(stats.position_tokens, 1)[:, None]
    rate = (stats.position_count / position_tokens).T
    mean = np.divide(
        stats.position_sum,
        stats.position_count,
        out=np.zeros_like(stats.position_sum),
        where=stats.position_count > 0,
    ).T
    return rate.astype(np.float32), mean.astype(np.float32)


def histogram_rows(histogram: Int[np.ndarray, "features bins"]) -> tuple[np.ndarray, list]:
    """Each feature's histogram from its first to its last nonzero bin, and that first bin."""
    nonzero = histogram > 0
    n_bins = nonzero.shape[1]
    fired = nonzero.any(1)
    first = np.where(fired, nonzero.argmax(1), 0)
    last = np.where(fired, n_bins - nonzero[:, ::-1].argmax(1), 0)
    return first, [counts[a:b] for counts, a, b in zip(histogram, first, last, strict=True)]


def feature_records(
    result: AccumulatedResult,
    decoder: Float[Tensor, "d_sae d_in"],
    unembed: Float[Tensor, "d_in vocab"] | None,
    settings: AnalysisSettings,
    edges: Float[np.ndarray, "d_sae edges"],
    absorbed: Absorption,
    description_length_bits: Float[np.ndarray, " d_sae"],
    tokens: TokenRankings,
    ground_truth: tuple[GroundTruthMatch, list[str]] | None = None,
    quiet: bool = True,
) -> FeatureColumns:
    """The `features` rows; `unembed` None (no language model) leaves the logit effects empty,
    `ground_truth` (the match and the true features' names) fills the ground-truth columns."""
    stats = result.stats
    n_features = len(stats.count)
    statistics = Statistics.of(result)
    position_rate, position_mean = positional_profile(stats)
    jaccard, miss_rate = encoder_decoder_agreement(result)
    neighbour_cosine, neighbour_id = decoder_neighbours(decoder, settings.n_neighbours, quiet)
    histogram_first_bin, histogram_counts = histogram_rows(stats.histogram)
    fired = stats.count > 0
    if unembed is not None:
        top_logit, top_token, bottom_logit, bottom_token = logit_effects(
            decoder, unembed, settings.n_logits
        )
        logits_top = JsonRows(token_id=top_token, logit=top_logit)
        logits_bottom = JsonRows(token_id=bottom_token, logit=bottom_logit)
    else:
        logits_top = logits_bottom = [[] for _ in range(n_features)]
    return FeatureColumns(
        feature_index=np.arange(n_features),
        count=stats.count,
        max_activation=stats.max,
        min_activation=stats.min,
        bos_count=stats.special_count,
        **vars(statistics),
        # A latent that never fires has no top activations to compare, nor firings to single out.
        jaccard=_where_fired(jaccard, fired),
        miss_rate=_where_fired(miss_rate, fired),
        **absorbed.columns(),
        decoder_auroc=_where_fired(absorbed.auroc, absorbed.n_firings > 0),
        description_length_bits=description_length_bits,
        decoder=decoder.cpu().numpy(),
        histogram_first_bin=histogram_first_bin,
        histogram_counts=histogram_counts,
        position_rate=position_rate,
        position_mean=position_mean,
        # Features that never fired have no bands.
        **_band_rows(edges, band_mass(stats.histogram, edges), fired),
        logits_top=logits_top,
        logits_bottom=logits_bottom,
        neighbours=JsonRows(feature_index=neighbour_id, cosine=neighbour_cosine),
        top_tokens=tokens.top_tokens,
        specific_tokens=tokens.specific_tokens,
        **ground_truth_columns(ground_truth),
    )


def _where_fired(values: np.ndarray, fired: np.ndarray) -> list[float | None]:
    return [value if active else None for value, active in zip(values.tolist(), fired, strict=True)]


def _band_rows(edges: np.ndarray, mass: np.ndarray, fired: np.ndarray) -> dict[str, list]:
    """The stored bands: none for a feature that never fired, one (all of its values) for a
    feature whose active values are all equal."""
    stored_edges, stored_mass = [], []
    for row, shares, active in zip(edges.tolist(), mass.tolist(), fired.tolist(), strict=True):
        if not active:
            row, shares = [], []
        elif len(row) > 2 and math.isinf(row[1]):
            row, shares = [row[0], row[-1]], [shares[0]]
        stored_edges.append(row)
        stored_mass.append(shares)
    return {"quantile_edges": stored_edges, "quantile_mass": stored_mass}


def ground_truth_columns(
    ground_truth: tuple[GroundTruthMatch, list[str]] | None,
) -> dict[str, list | None]:
    if ground_truth is None:
        return dict.fromkeys(("gt_feature", "gt_cosine", "composed_of", "composed_cosine"), None)
    match, names = ground_truth
    return {
        "gt_feature": [names[j] for j in match.best.tolist()],
        "gt_cosine": [round(x, 6) for x in match.cosine.tolist()],
        "composed_of": [[names[j] for j in pair] for pair in match.pair.tolist()],
        "composed_cosine": [round(x, 6) for x in match.pair_cosine.tolist()],
    }


def positional_r2(result: AccumulatedResult) -> np.ndarray:
    """Share of each feature's activation variance (zeros included) explained by position."""
    stats = result.stats
    n = stats.position_tokens.sum()
    mean = stats.sum / max(n, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        position_mean = stats.position_sum / stats.position_tokens[:, None]
        between = stats.position_tokens[:, None] * (position_mean - mean) ** 2
        between = np.nansum(np.where(stats.position_tokens[:, None] > 0, between, 0.0), axis=0)
        total = stats.sum_sq - n * mean**2
        r2 = np.where(total > 1e-12 * np.maximum(stats.sum_sq, 1e-30), between / total, 0.0)
    return np.clip(np.nan_to_num(r2), 0.0, 1.0)


def encoder_decoder_agreement(result: AccumulatedResult) -> tuple[np.ndarray, np.ndarray]:
    """Jaccard of the encoder-top and decoder-top position sets, and the share of decoder-top
    positions where the feature stays at zero."""
    top, decoder = result.top, result.decoder_top
    n_features = top.valid.shape[0]
    jaccard = np.zeros(n_features)
    top_tokens, decoder_tokens = top.tokens(), decoder.tokens()
    for i in range(n_features):
        a = set(top_tokens[i][top.valid[i]].tolist())
        b = set(decoder_tokens[i][decoder.valid[i]].tolist())
        jaccard[i] = len(a & b) / len(a | b) if a | b else 0.0
    missed = decoder.valid & (decoder.activation <= 0)
    miss_rate = missed.sum(1) / np.maximum(decoder.valid.sum(1), 1)
    return jaccard, miss_rate


@dataclass
class TokenRankings:
    """The token lists of each feature and the latent list of each token id, from the token
    table. A latent's specificity to a token: its mean activation over the token's occurrences
    (zeros included) as a multiple of its mean over all tokens; only pairs where the latent
    fires at least `min_token_firings` times on the token are ranked by it."""

    top_tokens: JsonRows
    """per feature, the tokens it fires on most often"""
    specific_tokens: JsonRows
    """per feature, the tokens it is most specific to"""
    token_stats: TokenStatColumns
    token_latents: TokenLatentColumns
    """per token id, the latents most specific to it, each with its strongest firing there"""

    @classmethod
    def of(cls, result: AccumulatedResult, settings: AnalysisSettings) -> TokenRankings:
        table, stats = result.tokens, result.stats
        entries = table.entries()
        occurrences = table.token_count[entries.token_id]
        with np.errstate(divide="ignore", invalid="ignore"):
            specificity = (entries.sum / occurrences) / (
                stats.sum[entries.feature_index] / max(stats.tokens_seen, 1)
            )
        columns = {
            "token_id": entries.token_id,
            "count": entries.count,
            "occurrences": occurrences,
            "mean_activation": entries.sum / np.maximum(entries.count, 1),
            "specificity": specificity,
        }
        ranked = np.flatnonzero(entries.count >= settings.min_token_firings)
        n_features, n = table.n_features, settings.n_top_tokens
        top = kernels.top_per_group(entries.feature_index, entries.count, n_features, n)
        specific = _subset_top(ranked, entries.feature_index, specificity, n_features, n)
        latents = _subset_top(
            ranked, entries.token_id, specificity, len(table.token_count), settings.n_token_latents
        )
        token, rank = np.nonzero(latents >= 0)
        pair = latents[token, rank]
        sequence_index, position = np.divmod(
            kernels.key_tokens(entries.best_key[pair]), result.top.context_length
        )
        seen = np.flatnonzero(table.token_count)
        return cls(
            top_tokens=_pair_rows(top, columns),
            specific_tokens=_pair_rows(specific, columns),
            token_stats=TokenStatColumns(token_id=seen, count=table.token_count[seen]),
            token_latents=TokenLatentColumns(
                token_id=token,
                rank=rank,
                feature_index=entries.feature_index[pair],
                count=entries.count[pair],
                mean_activation=columns["mean_activation"][pair],
                specificity=specificity[pair],
                sequence_index=sequence_index,
                position=position,
                activation=kernels.key_scores(entries.best_key[pair]),
            ),
        )


def _subset_top(
    subset: np.ndarray, groups: np.ndarray, scores: np.ndarray, n_groups: int, n: int
) -> np.ndarray:
    """`kernels.top_per_group` over the entries in `subset`, as indices of all entries."""
    top = kernels.top_per_group(groups[subset], scores[subset], n_groups, n)
    return np.where(top >= 0, subset[np.maximum(top, 0)] if len(subset) else -1, -1)


def _pair_rows(top: np.ndarray, columns: dict[str, np.ndarray]) -> JsonRows:
    """Rows of `top` [groups, n] (indices of pairs, -1 padding) as JSON lists of the columns."""
    kept = top >= 0
    index = np.maximum(top, 0)
    if not len(columns["token_id"]):
        return JsonRows(kept, **{name: np.zeros(top.shape) for name in columns})
    return JsonRows(kept, **{name: values[index] for name, values in columns.items()})


def example_records(
    result: AccumulatedResult, settings: AnalysisSettings, edges: Float[np.ndarray, "d_sae edges"]
) -> ExampleColumns:
    """The `examples` rows: one per feature and kind that has examples."""
    parts = []
    for kind in ("top", "bottom", "decoder_top"):
        examples: KeptExamples = getattr(result, kind)
        feature, slot = np.nonzero(examples.valid)  # feature-major, best first
        projection = examples.scores(feature, slot) if kind == "decoder_top" else None
        parts.append(_example_rows(examples, feature, slot, kind, None, projection))
    parts.append(_quantile_examples(result.active_sample, settings, edges))
    return ExampleColumns.concatenate(parts)


def _quantile_examples(
    sample: KeptExamples, settings: AnalysisSettings, edges: Float[np.ndarray, "d_sae edges"]
) -> ExampleColumns:
    """Up to `examples_per_band` of the active sample per band, in the sample's random order."""
    n_bands = edges.shape[1] - 1
    feature, slot = np.nonzero(sample.valid)
    band = band_of(edges[feature], sample.activation[feature, slot])
    # Stable: feature-major, then by band, each band in the sample's order.
    group = feature * n_bands + band
    order = np.argsort(group, kind="stable")
    keep = order[ranks_within_groups(group[order]) < settings.examples_per_band]
    return _example_rows(sample, feature[keep], slot[keep], "quantile", band[keep], None)


def _example_rows(
    examples: KeptExamples,
    feature: np.ndarray,
    slot: np.ndarray,
    kind: str,
    band: np.ndarray | None,
    projection: np.ndarray | None,
) -> ExampleColumns:
    """One row per feature in `feature` (ascending), each field an array over that feature's
    examples in the given order."""
    starts = np.flatnonzero(np.r_[True, feature[1:] != feature[:-1]][: len(feature)])
    n = len(starts)
    sequence_index, position = examples.located(feature, slot)

    def per_row(values: np.ndarray | None) -> Sequence:
        return [None] * n if values is None else RowSlices(values, starts)

    return ExampleColumns(
        feature_index=feature[starts].tolist(),
        kind=[kind] * n,
        sequence_index=per_row(sequence_index),
        position=per_row(position),
        activation=per_row(examples.activation[feature, slot]),
        band=per_row(band),
        projection=per_row(projection),
        window_activations=RowSlices(examples.window, starts, at=(feature, slot)),
    )
