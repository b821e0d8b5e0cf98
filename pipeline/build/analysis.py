"""From accumulated state and SAE weights to the per-feature rows the database stores."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from saescope.db.writer import float32_blob, int32_blob
from saescope.pipeline.build import kernels
from saescope.pipeline.build.accumulators import (
    AccumulatedResult,
    ExamplesResult,
    unit_rows,
)
from saescope.pipeline.build.kernels import histogram_edges
from saescope.pipeline.synthetic.data import GroundTruthMatch

# Flag rules (documented in the README).
POSITIONAL_R2_THRESHOLD = 0.5
BOS_SHARE_THRESHOLD = 0.5
ABSORBED_MISS_RATE = 0.4
ABSORBER_SHARE = 0.5
# The absorption measure needs this many firings of a feature in the position sample; its
# absorbers are summed over at most ABSORBER_POSITIONS missed positions (a random subset).
ABSORPTION_MIN_FIRINGS = 20
ABSORBER_POSITIONS = 64


@dataclass
class AnalysisSettings:
    """Sizes of the derived per-feature tables."""

    high_frequency_threshold: float = 0.1
    """a feature firing on more than this share of tokens is flagged high-frequency"""
    quantile_bands: int = 10
    """the active values are cut into this many bands at equally spaced quantiles"""
    examples_per_band: int = 4
    """random examples shown per quantile band"""
    n_logits: int = 10
    """top and bottom tokens of W_dec·W_U"""
    n_neighbours: int = 10
    """nearest latents by decoder cosine"""
    n_top_tokens: int = 10
    """tokens a feature fires on most"""
    n_token_latents: int = 16
    """latents kept per token id for token search"""
    n_absorbers: int = 5
    """absorbing latents kept per feature"""


def grouped_order(groups: Tensor, key: Tensor) -> Tensor:
    """Indices ordered by group, then by key, ties in their original order (two stable torch
    sorts: about 3× faster than np.lexsort on millions of entries)."""
    order = torch.argsort(key, stable=True)
    return order[torch.argsort(groups[order], stable=True)]


def ranks_within_groups(sorted_groups: np.ndarray) -> np.ndarray:
    """0, 1, 2, … within each run of equal values of an array sorted by group."""
    if len(sorted_groups) == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    lengths = np.diff(np.r_[starts, len(sorted_groups)])
    return np.arange(len(sorted_groups)) - np.repeat(starts, lengths)


def quantile_edges(
    histogram: Int[np.ndarray, "features bins"],
    low: Float[np.ndarray, " features"],
    high: Float[np.ndarray, " features"],
    n_bands: int,
) -> Float[np.ndarray, "features edges"]:
    """Per feature, cut points at quantiles 0, 1/n, …, 1 of its active values, interpolated
    geometrically inside the fine log-spaced bin that holds each quantile (ends exact: min and
    max); nan for a feature that never fired."""
    n_bins = histogram.shape[1]
    finite = histogram_edges()
    cumulative = np.cumsum(histogram, axis=1)
    total = cumulative[:, -1:]
    target = total * np.arange(1, n_bands) / n_bands
    # The bin holding each quantile: the first whose cumulative count reaches it (one band at a
    # time keeps the comparison features × bins).
    bin = np.zeros(target.shape, np.int64)
    for j in range(n_bands - 1):
        bin[:, j] = (cumulative < target[:, [j]]).sum(1)
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
    edges = np.concatenate([low, inner, high], axis=1)
    edges[total[:, 0] == 0] = np.nan
    return edges


def _bands(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
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
    n_features, n_bands = edges.shape[0], edges.shape[1] - 1
    finite = histogram_edges()
    centres = np.r_[finite[0], np.sqrt(finite[:-1] * finite[1:]), finite[-1]]
    cell = np.arange(n_features)[:, None] * n_bands + _bands(edges[:, None, :], centres)
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
    decoder: Float[Tensor, "d_sae d_in"], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """The n latents with the highest decoder cosine to each latent (itself excluded)."""
    unit = unit_rows(decoder)
    n = min(n, decoder.shape[0] - 1)
    values, ids = [], []
    for start in range(0, unit.shape[0], 1024):
        cosine = unit[start : start + 1024] @ unit.T
        own = torch.arange(start, start + cosine.shape[0])
        cosine[torch.arange(cosine.shape[0]), own] = -2.0
        v, i = cosine.topk(n, dim=1)
        values.append(v)
        ids.append(i)
    return torch.cat(values).cpu().numpy(), torch.cat(ids).cpu().numpy()


def group_medians(values: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """The median of the values of each group 0 .. n_groups − 1 (nan for an empty group)."""
    if len(values) == 0:
        return torch.full((n_groups,), math.nan, device=values.device)
    ordered = values[grouped_order(groups, values)]
    counts = torch.bincount(groups, minlength=n_groups)
    starts = torch.cumsum(counts, 0) - counts
    # Empty groups point anywhere valid; they are masked below.
    low = (starts + (counts - 1) // 2).clamp(0, len(values) - 1)
    high = (starts + counts // 2).clamp(0, len(values) - 1)
    median = (ordered[low] + ordered[high]) / 2
    return torch.where(counts > 0, median, math.nan)


@dataclass
class ActiveEntries:
    """The (row, latent, value) entries where the SAE fires on a set of rows, row-major."""

    row: Tensor
    col: Tensor
    value: Tensor
    per_row: Tensor  # entries of each row
    n_features: int

    def sums_over(
        self, rows: Tensor, groups: Tensor, n_groups: int
    ) -> tuple[Float[Tensor, "groups d_sae"], Int[Tensor, "groups d_sae"]]:
        """For each group, Σ f_j and the number of firings of every latent j over the given rows
        (row `rows[k]` counted in group `groups[k]`)."""
        per_row = self.per_row
        row_start = torch.cumsum(per_row, 0) - per_row
        total = torch.zeros(n_groups * self.n_features, device=self.value.device)
        count = torch.zeros(n_groups * self.n_features, dtype=torch.int64, device=total.device)
        for start in range(0, len(rows), 1 << 16):
            # Each row's run of entries, expanded: entry = its row's start + offset in the run.
            here = rows[start : start + (1 << 16)]
            n_active = per_row[here]
            entry = torch.repeat_interleave(
                row_start[here] - (torch.cumsum(n_active, 0) - n_active), n_active
            )
            entry += torch.arange(len(entry), device=entry.device)
            group = torch.repeat_interleave(groups[start : start + (1 << 16)], n_active)
            cell = group * self.n_features + self.col[entry]
            total.index_add_(0, cell, self.value[entry])
            count.index_add_(0, cell, torch.ones_like(cell))
        return total.view(n_groups, -1), count.view(n_groups, -1)


def _active_entries(x: Tensor, encode: Callable[[Tensor], Tensor]) -> ActiveEntries:
    rows, cols, values = [], [], []
    for start in range(0, len(x), 4096):
        acts = encode(x[start : start + 4096]).float()
        r, c = torch.nonzero(acts > 0, as_tuple=True)
        rows.append(r + start)
        cols.append(c)
        values.append(acts[r, c])
    row = torch.cat(rows)
    per_row = torch.bincount(row, minlength=len(x))
    return ActiveEntries(row, torch.cat(cols), torch.cat(values), per_row, acts.shape[1])


@dataclass
class Absorption:
    present_miss_rate: np.ndarray  # nan where the feature fires too rarely in the sample
    present_positions: np.ndarray  # sampled positions where its decoder direction is present
    absorbers: list[list[dict]]


def absorption(
    inputs: Float[Tensor, "n d_in"],
    encode: Callable[[Tensor], Tensor],
    decoder: Float[Tensor, "d_sae d_in"],
    decoder_bias: Float[Tensor, " d_in"],
    n_absorbers: int,
    features_per_chunk: int = 1024,
) -> Absorption:
    """Feature absorption measured on a uniform sample of positions.

    Feature i's decoder direction counts as present where its projection p_i = (x − b_dec)·ŵ_i
    reaches the median of p_i over the sampled positions where i fires. The present miss rate is
    the share of those positions where f_i = 0; the absorbers are the latents j active on them
    (on at most ABSORBER_POSITIONS of them, taken in the sample's random order), ranked by
    Σ f_j·(ŵ_i·W_dec[j]), i.e. how much of i's direction they write instead, with that sum's
    share of Σ p_i over the same positions."""
    n_features = decoder.shape[0]
    n = inputs.shape[0]
    unit = unit_rows(decoder)
    x = inputs.to(decoder.dtype)
    active = _active_entries(x, encode)
    centred = x - decoder_bias
    miss_rate = np.full(n_features, np.nan)
    present_positions = np.zeros(n_features, dtype=np.int64)
    absorbers: list[list[dict]] = []
    for a in range(0, n_features, features_per_chunk):
        b = min(a + features_per_chunk, n_features)
        projection = centred @ unit[a:b].T
        in_chunk = torch.nonzero((active.col >= a) & (active.col < b)).squeeze(1)
        fired_row, fired_feature = active.row[in_chunk], active.col[in_chunk] - a
        fired = torch.zeros(n, b - a, dtype=torch.bool, device=x.device)
        fired[fired_row, fired_feature] = True
        threshold = group_medians(projection[fired_row, fired_feature], fired_feature, b - a)
        measurable = torch.bincount(fired_feature, minlength=b - a) >= ABSORPTION_MIN_FIRINGS
        # The sample is in random order: the first missed positions are a uniform subset.
        n_present, n_missed, examined, examined_sum = kernels.presence(
            projection.float().cpu().numpy(),
            fired.cpu().numpy(),
            threshold.float().cpu().numpy(),
            measurable.cpu().numpy(),
            ABSORBER_POSITIONS,
            numba.get_num_threads(),
        )
        rate = n_missed / np.maximum(n_present, 1)
        miss_rate[a:b] = np.where(measurable.cpu().numpy(), rate, math.nan)
        present_positions[a:b] = n_present
        examined_feature, examined_slot = np.nonzero(examined >= 0)
        activation_sum, count = active.sums_over(
            torch.from_numpy(examined[examined_feature, examined_slot]).to(x.device),
            torch.from_numpy(examined_feature).to(x.device),
            b - a,
        )
        weight = activation_sum * (unit[a:b] @ decoder.T)
        missed_projection = torch.from_numpy(examined_sum).to(weight).clamp_min(1e-12).unsqueeze(1)
        share = weight / missed_projection
        top_weight, top_latent = weight.topk(min(n_absorbers, n_features), dim=1)
        for weights, latents, counts, shares in zip(
            top_weight.tolist(),
            top_latent.tolist(),
            count.gather(1, top_latent).tolist(),
            share.gather(1, top_latent).tolist(),
            strict=True,
        ):
            absorbers.append(
                [
                    {"feature_index": j, "weight": round(w, 6), "share": round(h, 6), "count": c}
                    for w, j, c, h in zip(weights, latents, counts, shares, strict=True)
                    if w > 0
                ]
            )
    return Absorption(miss_rate, present_positions, absorbers)


def feature_columns(
    result: AccumulatedResult,
    decoder: Float[Tensor, "d_sae d_in"],
    unembed: Float[Tensor, "d_in vocab"],
    settings: AnalysisSettings,
    edges: Float[np.ndarray, "d_sae edges"],
    absorbed: Absorption,
    ground_truth: tuple[GroundTruthMatch, list[str]] | None = None,
) -> dict[str, list]:
    """The `features` table as columns, one entry per feature; `unembed` None (no language
    model) leaves the logit effects empty, `ground_truth` (the match and the true features'
    names) fills the ground-truth columns."""
    stats = result.stats
    n_features = len(stats.count)
    tokens_seen = max(stats.tokens_seen, 1)
    frequency = stats.count / tokens_seen
    mean_activation = np.divide(
        stats.sum, stats.count, out=np.zeros(n_features), where=stats.count > 0
    )
    fired_anywhere = stats.count + stats.special_count
    bos_share = np.divide(
        stats.special_count, fired_anywhere, out=np.zeros(n_features), where=fired_anywhere > 0
    )
    r2 = positional_r2(result)
    position_tokens = np.maximum(stats.position_tokens, 1)[:, None]
    position_rate = (stats.position_count / position_tokens).T
    position_mean = np.divide(
        stats.position_sum,
        stats.position_count,
        out=np.zeros_like(stats.position_sum),
        where=stats.position_count > 0,
    ).T
    jaccard, miss_rate = encoder_decoder_agreement(result)
    neighbour_cosine, neighbour_id = decoder_neighbours(decoder, settings.n_neighbours)
    # The histogram is stored from its first to its last nonzero bin.
    nonzero = stats.histogram > 0
    n_bins = nonzero.shape[1]
    fired = nonzero.any(1)
    first = np.where(fired, nonzero.argmax(1), 0)
    last = np.where(fired, n_bins - nonzero[:, ::-1].argmax(1), 0)
    top_share = np.array([a[0]["share"] if a else -np.inf for a in absorbed.absorbers])
    present_miss_rate = absorbed.present_miss_rate
    if unembed is not None:
        top_logit, top_token, bottom_logit, bottom_token = logit_effects(
            decoder, unembed, settings.n_logits
        )
        logits_top = _pairs(top_token, top_logit, "token_id", "logit")
        logits_bottom = _pairs(bottom_token, bottom_logit, "token_id", "logit")
    else:
        logits_top = logits_bottom = [[] for _ in range(n_features)]
    return {
        "feature_index": list(range(n_features)),
        "count": stats.count.tolist(),
        "frequency": frequency.tolist(),
        "mean_activation": mean_activation.tolist(),
        "max_activation": stats.max.tolist(),
        "min_activation": stats.min.tolist(),
        "bos_count": stats.special_count.tolist(),
        "bos_share": bos_share.tolist(),
        "positional_r2": r2.tolist(),
        "dead": (stats.count == 0).tolist(),
        "high_frequency": (frequency > settings.high_frequency_threshold).tolist(),
        "positional": (r2 > POSITIONAL_R2_THRESHOLD).tolist(),
        "bos_dominated": (bos_share > BOS_SHARE_THRESHOLD).tolist(),
        "absorbed": (
            (present_miss_rate >= ABSORBED_MISS_RATE) & (top_share >= ABSORBER_SHARE)
        ).tolist(),
        "jaccard": jaccard.tolist(),
        "miss_rate": miss_rate.tolist(),
        "present_miss_rate": [None if math.isnan(x) else x for x in present_miss_rate.tolist()],
        "present_positions": absorbed.present_positions.tolist(),
        "absorbers": absorbed.absorbers,
        "histogram_first_bin": first.tolist(),
        "histogram_counts": [
            int32_blob(counts[a:b])
            for counts, a, b in zip(stats.histogram, first, last, strict=True)
        ],
        "position_rate": [float32_blob(rate) for rate in position_rate],
        "position_mean": [float32_blob(mean) for mean in position_mean],
        # Features that never fired have no bands.
        "quantile_edges": _where_fired(edges, fired),
        "quantile_mass": _where_fired(band_mass(stats.histogram, edges), fired),
        "logits_top": logits_top,
        "logits_bottom": logits_bottom,
        "neighbours": _pairs(neighbour_id, neighbour_cosine, "feature_index", "cosine"),
        "top_tokens": feature_top_tokens(result, settings.n_top_tokens),
        **ground_truth_columns(ground_truth, n_features),
    }


def _where_fired(rows: np.ndarray, fired: np.ndarray) -> list[list[float]]:
    return [row if f else [] for row, f in zip(rows.tolist(), fired.tolist(), strict=True)]


def ground_truth_columns(
    ground_truth: tuple[GroundTruthMatch, list[str]] | None, n_features: int
) -> dict[str, list]:
    if ground_truth is None:
        return dict.fromkeys(("gt_feature", "gt_cosine", "composed_of", "composed_cosine"), None)
    match, names = ground_truth
    return {
        "gt_feature": [names[j] for j in match.best.tolist()],
        "gt_cosine": [round(x, 6) for x in match.cosine.tolist()],
        "composed_of": [[names[j] for j in pair] for pair in match.pair.tolist()],
        "composed_cosine": [round(x, 6) for x in match.pair_cosine.tolist()],
    }


def _pairs(ids: np.ndarray, values: np.ndarray, id_name: str, value_name: str) -> list[list[dict]]:
    """Rows of (id, value) pairs as lists of {id_name: id, value_name: value}."""
    return [
        [{id_name: a, value_name: round(b, 6)} for a, b in zip(id_row, value_row, strict=True)]
        for id_row, value_row in zip(ids.tolist(), values.tolist(), strict=True)
    ]


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
    ctx_key = top.sequence_index.astype(np.int64) * 1_000_003 + top.position
    decoder_key = decoder.sequence_index.astype(np.int64) * 1_000_003 + decoder.position
    jaccard = np.zeros(n_features)
    for i in range(n_features):
        a = set(ctx_key[i][top.valid[i]].tolist())
        b = set(decoder_key[i][decoder.valid[i]].tolist())
        jaccard[i] = len(a & b) / len(a | b) if a | b else 0.0
    missed = decoder.valid & (decoder.activation <= 0)
    miss_rate = missed.sum(1) / np.maximum(decoder.valid.sum(1), 1)
    return jaccard, miss_rate


def feature_top_tokens(result: AccumulatedResult, n: int) -> list[list[dict]]:
    """Per feature, the tokens it fires on most often, with the mean activation there."""
    token, count, total = result.tokens.top_tokens(n)
    mean = np.divide(total, count, out=np.zeros_like(total), where=token >= 0)
    return [
        [
            {"token_id": t, "count": c, "mean_activation": round(m, 6)}
            for t, c, m in zip(*row, strict=True)
            if t >= 0
        ]
        for row in zip(token.tolist(), count.tolist(), mean.tolist(), strict=True)
    ]


def token_columns(result: AccumulatedResult, n: int) -> tuple[dict[str, list], dict[str, list]]:
    """Token occurrence counts, and per token the latents with the highest mean activation over
    all its occurrences (a latent that fires rarely on the token ranks low)."""
    table = result.tokens
    seen = np.flatnonzero(table.token_count)
    stats = {"token_id": seen.tolist(), "count": table.token_count[seen].tolist()}
    feature, count, mean = table.top_latents(n)
    token, rank = np.nonzero(feature >= 0)
    latents = {
        "token_id": token.tolist(),
        "rank": rank.tolist(),
        "feature_index": feature[token, rank].tolist(),
        "count": count[token, rank].tolist(),
        "mean_activation": mean[token, rank].tolist(),
    }
    return stats, latents


def example_columns(
    result: AccumulatedResult, settings: AnalysisSettings, edges: Float[np.ndarray, "d_sae edges"]
) -> dict[str, list]:
    """The `examples` table as columns: one row per feature and kind that has examples."""
    parts = []
    for kind in ("top", "bottom", "decoder_top"):
        examples: ExamplesResult = getattr(result, kind)
        feature, slot = np.nonzero(examples.valid)  # feature-major, best first
        projection = examples.score[feature, slot] if kind == "decoder_top" else None
        parts.append(_columns(examples, feature, slot, kind, None, projection))
    parts.append(_quantile_columns(result.random, settings, edges))
    return {name: [x for part in parts for x in part[name]] for name in parts[0]}


def _quantile_columns(
    random: ExamplesResult, settings: AnalysisSettings, edges: Float[np.ndarray, "d_sae edges"]
) -> dict[str, list]:
    """Up to `examples_per_band` of the random sample per band, in the sample's random order."""
    per_band = settings.examples_per_band
    n_bands = edges.shape[1] - 1
    feature, slot = np.nonzero(random.valid)
    activation = random.activation[feature, slot]
    band = _bands(edges[feature], activation)
    # Stable: feature-major, then by band, each band in the sample's order.
    group = feature * n_bands + band
    order = np.argsort(group, kind="stable")
    keep = order[ranks_within_groups(group[order]) < per_band]
    return _columns(random, feature[keep], slot[keep], "quantile", band[keep], None)


def _columns(
    examples: ExamplesResult,
    feature: np.ndarray,
    slot: np.ndarray,
    kind: str,
    band: np.ndarray | None,
    projection: np.ndarray | None,
) -> dict[str, list]:
    """One row per feature in `feature` (ascending), each field packed into a blob of that
    feature's examples in the given order."""
    starts = np.flatnonzero(np.r_[True, feature[1:] != feature[:-1]][: len(feature)])
    n = len(starts)

    def packed(values: np.ndarray, dtype: str) -> list[bytes]:
        parts = np.split(values.astype(dtype), starts[1:]) if n else []
        return [part.tobytes() for part in parts]

    return {
        "feature_index": feature[starts].tolist(),
        "kind": [kind] * n,
        "sequence_index": packed(examples.sequence_index[feature, slot], "<i4"),
        "position": packed(examples.position[feature, slot], "<i4"),
        "activation": packed(examples.activation[feature, slot], "<f4"),
        "band": packed(band, "<i4") if band is not None else [None] * n,
        "projection": packed(projection, "<f4") if projection is not None else [None] * n,
        "window_activations": packed(examples.window[feature, slot], "<f4"),
    }
