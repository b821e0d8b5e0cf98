"""Feature absorption, measured on the build's uniform sample of positions: the share of the
strong writes along a latent's decoder direction that other latents make where it stays off.

Notation: x the hook's activation at a position t, f = SAE.encode(x), ŵ_i = W_dec[i]/‖W_dec[i]‖.

    own write        S_i(t) = f_i(t)·‖W_dec[i]‖      (what i writes along ŵ_i)
    neighbours       N_i    = {j ≠ i : cos(ŵ_i, ŵ_j) ≥ NEIGHBOUR_COSINE}
    substitutes      N'_i   = {j ∈ N_i : j fires on at most MAX_COFIRING of i's firings}
    their write      W_i(t) = Σ_{j ∈ N'_i} f_j(t)·(ŵ_i·W_dec[j])
    floor            τ_i    = the median of S_i over the positions where i fires
    absorbed at t    A_i(t) = W_i(t) where f_i(t) = 0 and W_i(t) ≥ τ_i, else 0
    own, counted     O_i(t) = S_i(t) where S_i(t) ≥ τ_i, else 0
    absorption       R_i    = Σ_t A_i / (Σ_t A_i + Σ_t O_i)

Only substitutes absorb: a latent that fires where i stays off and rarely with it (the child of
Chanin et al.'s hierarchy: on its tokens the parent is silent, or fires beside it now and then
where the absorption is partial). A companion that fires with i on a good part of its firings,
and writes some of its direction, is overlap, not absorption, however much it writes where i is
off.

A mass share, not a count: every count of positions where i is off tracks how rare i is, since
inactive positions outnumber active ones by about 1/frequency. The floor asks the neighbours to
write what i writes at a typical firing of its own (substitution, as the child latent of Chanin
et al.'s hierarchy does for its parent) rather than some of i's direction as a side effect of
pointing partly the same way; applied to i's own writes too, it keeps R_i unbiased.

Not measurable (no value, a reason instead), in this order: fewer than MIN_FIRINGS firings in the
sample; at its own firings i writes less than MIN_OWN_SHARE of the mass along ŵ_i (a correction
riding on its neighbours); or its decoder projection (x − b_dec)·ŵ_i does not separate its
firings from background positions (i off, no neighbour firing): AUROC below MIN_AUROC.

The interval is a percentile bootstrap over sequences (their positions move together), with the
upper end raised to the rule of three where no absorbed position was seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from saescope.pipeline.notices import sparse_beta_notice_silenced
from saescope.pipeline.saes import row_chunks, unit_rows

NEIGHBOUR_COSINE = 0.5
"""decoder cosine at which another latent can absorb i: well above the best cosine expected by
chance among the demo's random directions (√(2 ln d_sae / d_in) ≈ 0.35)"""
MAX_COFIRING = 0.3
"""share of i's firings on which a neighbour may fire too and still count as a substitute: above
what partial absorption leaves in hierarchical data (children fire with their absorbed parent on
up to about a quarter of its firings), below what a companion that merely overlaps does"""
FLOOR_QUANTILE = 0.5
MIN_FIRINGS = 20
MIN_OWN_SHARE = 0.5
MIN_AUROC = 0.9
BACKGROUND_POSITIONS = 4096
"""random positions from which each latent's background for the AUROC is taken"""
BOOTSTRAP_REPLICATES = 200
CONFIDENCE = 0.95
AUROC_BINS = 1024
# Latents per chunk: bounded so that a chunk's [latents, positions] tables stay within about
# CHUNK_CELLS floats each; the neighbour search's tiles hold CHUNK_CELLS cosines.
CHUNK_CELLS = 1 << 24
MAX_CHUNK = 512


@dataclass
class Absorption:
    value: np.ndarray  # [d_sae] R_i, nan where not measurable
    low: np.ndarray  # [d_sae] the interval, nan where not measurable
    high: np.ndarray
    reason: list[str | None]  # why not measurable; None where measurable
    absorbed_positions: np.ndarray  # [d_sae] sampled positions counted as absorbed
    absorbers: list[list[dict]]  # per latent: feature_index, weight, share, count, cofiring
    auroc: np.ndarray  # [d_sae] of the decoder projection, firings against background
    own_share: np.ndarray  # [d_sae] i's share of the mass along ŵ_i where it fires
    n_firings: np.ndarray  # [d_sae] its firings in the sample

    def columns(self) -> dict[str, Any]:
        """Its columns of the `features` table, what cannot be measured as None."""
        return {
            "absorption": _nan_as_none(self.value),
            "absorption_low": _nan_as_none(self.low),
            "absorption_high": _nan_as_none(self.high),
            "absorption_reason": self.reason,
            "absorbed_positions": self.absorbed_positions,
            "absorbers": self.absorbers,
        }


def _nan_as_none(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(value) else value for value in values.tolist()]


def sparse_activations(
    x: Float[Tensor, "n d_in"], encode: Callable[[Tensor], Tensor], d_sae: int
) -> Tensor:
    """f = encode(x) as a sparse CSR matrix [n, d_sae] of the active entries."""
    index, values, start = [], [], 0
    for part in row_chunks(x, d_sae):
        acts = encode(part).float()
        row, col = torch.nonzero(acts > 0, as_tuple=True)
        index.append(torch.stack([row + start, col]))
        values.append(acts[row, col])
        start += len(part)
    coo = torch.sparse_coo_tensor(torch.cat(index, 1), torch.cat(values), (len(x), d_sae))
    return coo.coalesce().to_sparse_csr()


def group_quantile(
    values: Tensor, groups: Int[Tensor, " n"], n_groups: int, q: float
) -> Float[Tensor, " groups"]:
    """The lower q-quantile of each group's non-negative values; inf for an empty group."""
    if len(values) == 0:
        return torch.full((n_groups,), math.inf, device=values.device)
    key = groups.double() * (float(values.max()) + 1.0) + values.double()
    ordered = values[key.argsort()]
    count = torch.bincount(groups, minlength=n_groups)
    start = torch.cumsum(count, 0) - count
    index = (start + ((count - 1).clamp_min(0).float() * q).floor().long()).clamp(
        0, len(values) - 1
    )
    return torch.where(count > 0, ordered[index], math.inf)


def binned_auroc(
    positive_row: Int[Tensor, " k"],
    positive_score: Float[Tensor, " k"],
    negative_score: Float[Tensor, "m p"],
    negative: torch.BoolTensor,
    n_bins: int = AUROC_BINS,
) -> Float[Tensor, " m"]:
    """Per row, P(a positive scores above a negative), ties a half (Mann–Whitney U over the
    pairs). Positives are entries (row, score); negatives a [m, p] score matrix with a mask.
    Negatives outside a row's range of positives count exactly; inside it, scores share
    n_bins linear bins, and two scores in one bin count as a tie (no sort)."""
    m = negative_score.shape[0]
    low = torch.full((m,), math.inf).scatter_reduce(0, positive_row, positive_score, "amin")
    high = torch.full((m,), -math.inf).scatter_reduce(0, positive_row, positive_score, "amax")
    width = ((high - low) / n_bins).clamp_min(1e-12)
    size = m * (n_bins + 2)

    def cells(row: Tensor, score: Tensor, low: Tensor, high: Tensor, width: Tensor) -> Tensor:
        # 0: below the row's lowest positive; 1 .. n_bins inside; n_bins + 1: above its highest.
        inside = ((score - low) / width).clamp(0, n_bins - 1).long() + 1
        cell = torch.where(score < low, 0, torch.where(score > high, n_bins + 1, inside))
        return cell + row * (n_bins + 2)

    rows = torch.arange(m).unsqueeze(1)
    negatives = torch.bincount(
        cells(rows, negative_score, low[:, None], high[:, None], width[:, None]).ravel(),
        negative.ravel().double(),
        minlength=size,
    ).view(m, -1)
    positives = (
        torch.bincount(
            cells(
                positive_row,
                positive_score,
                low[positive_row],
                high[positive_row],
                width[positive_row],
            ),
            minlength=size,
        )
        .double()
        .view(m, -1)
    )
    below = torch.cumsum(negatives, 1) - negatives
    u = (positives * (below + negatives / 2)).sum(1)
    return (u / (positives.sum(1) * negatives.sum(1)).clamp_min(1)).float()


def absorption(*args, **kwargs) -> Absorption:
    """The absorption of every latent on a sample of positions (see `_absorption`), without
    gradients; torch's notice that its sparse tensors are in beta is of no use to a user."""
    with sparse_beta_notice_silenced(), torch.no_grad():
        return _absorption(*args, **kwargs)


def _absorption(
    x: Float[Tensor, "n d_in"],
    sequence: Int[Tensor, " n"],
    encode: Callable[[Tensor], Tensor],
    decoder: Float[Tensor, "d_sae d_in"],
    decoder_bias: Float[Tensor, " d_in"],
    n_absorbers: int,
    seed: int,
    target: Float[Tensor, "n d_out"] | None = None,
    quiet: bool = True,
) -> Absorption:
    """The absorption of every latent on a sample of positions: `x` the hook's activations
    there, `sequence` the sequence each position lies in (the bootstrap's unit), `target` the
    activations the decoder writes there, where its directions are measured (a transcoder's
    output hook; by default `x`)."""
    x, decoder = x.float().cpu(), decoder.float().cpu()
    n, d_sae = x.shape[0], decoder.shape[0]
    f = sparse_activations(x, encode, d_sae)  # [n, d_sae]
    f_by_latent = f.to_sparse_coo().t().coalesce().to_sparse_csr()  # [d_sae, n]
    norms, unit = decoder.norm(dim=1), unit_rows(decoder)
    graph = neighbour_graph(unit)
    graph_crow = graph.crow_indices()
    target = x if target is None else target.float().cpu()
    projection_base = target - decoder_bias.float().cpu()
    _, group = torch.unique(sequence.cpu(), return_inverse=True)
    n_groups = int(group.max()) + 1 if n else 0
    generator = torch.Generator().manual_seed(seed)
    weights = torch.poisson(torch.ones(BOOTSTRAP_REPLICATES, n_groups), generator=generator)
    pool = torch.randperm(n, generator=generator)[:BACKGROUND_POSITIONS]
    tail = (1 - CONFIDENCE) / 2

    value, low, high = (np.full(d_sae, np.nan) for _ in range(3))
    auroc, own_share = np.zeros(d_sae), np.zeros(d_sae)
    n_firings = np.zeros(d_sae, np.int64)
    absorbed_positions = np.zeros(d_sae, np.int64)
    absorbers: list[list[dict]] = []
    chunk = max(1, min(MAX_CHUNK, CHUNK_CELLS // max(n, 1)))
    for a in tqdm(range(0, d_sae, chunk), desc="absorption", unit="chunk", disable=quiet):
        b = min(a + chunk, d_sae)
        m = b - a
        own = torch.arange(m)
        crow = f_by_latent.crow_indices()
        latent = torch.repeat_interleave(own, crow[a + 1 : b + 1] - crow[a:b])
        position = f_by_latent.col_indices()[int(crow[a]) : int(crow[b])]
        activation = f_by_latent.values()[int(crow[a]) : int(crow[b])]
        fires = torch.zeros(m, n, dtype=torch.bool)
        fires[latent, position] = True
        count = torch.bincount(latent, minlength=m)
        # `along[i, j]` = ŵ_i·W_dec[j] for i's neighbours j, over the chunk's neighbours only.
        row_start, row_end = int(graph_crow[a]), int(graph_crow[b])
        row = torch.repeat_interleave(own, graph_crow[a + 1 : b + 1] - graph_crow[a:b])
        neighbour = graph.col_indices()[row_start:row_end]
        columns, column = torch.unique(neighbour, return_inverse=True)
        along = torch.zeros(m, len(columns))
        along[row, column] = graph.values()[row_start:row_end] * norms[neighbour]
        near, near_by_latent = _columns(f_by_latent, columns)  # [n, c], [c, n]
        fired_near = _ones(near_by_latent)
        cofiring = (fired_near @ fires.float().T).T / count.clamp_min(1)[:, None]  # [m, c]
        own_write = activation * norms[a:b][latent]  # S_i(t) where i fires
        floor = group_quantile(own_write, latent, m, FLOOR_QUANTILE)
        # Every neighbour's write (what i's own firings ride on, and the background of its
        # AUROC), and the substitutes' alone: W_i(t).
        written_by_all = (near @ along.T).T.contiguous()  # [m, n]
        along = torch.where(cofiring <= MAX_COFIRING, along, 0.0)
        written = (near @ along.T).T.contiguous()
        absorbed_at = ~fires & (written >= floor.unsqueeze(1)) & (written > 0)
        absorbed = torch.where(absorbed_at, written, 0.0)
        absorbed_count = absorbed_at.sum(1)
        counted_own = torch.where(own_write >= floor[latent], own_write, 0.0)
        # Sums per sequence, for the totals and the bootstrap.
        per_group_absorbed = torch.zeros(m, n_groups).index_add_(1, group, absorbed)
        per_group_own = (
            torch.zeros(m * n_groups)
            .index_add_(0, latent * n_groups + group[position], counted_own)
            .view(m, n_groups)
        )
        total_absorbed, total_own = per_group_absorbed.sum(1), per_group_own.sum(1)
        total = total_absorbed + total_own
        boot_absorbed = per_group_absorbed @ weights.T  # [m, replicates]
        boot = boot_absorbed / (boot_absorbed + per_group_own @ weights.T).clamp_min(1e-30)
        chunk_low = torch.quantile(boot, tail, dim=1)
        chunk_high = torch.quantile(boot, 1 - tail, dim=1)
        # No absorbed position seen: the upper end is the share three absorbed positions at
        # the floor would have (the rule of three), not the bootstrap's 0.
        three = 3 * floor.clamp_max(1e30)
        chunk_high = torch.where(
            absorbed_count == 0,
            torch.maximum(chunk_high, three / (three + total_own).clamp_min(1e-30)),
            chunk_high,
        )
        # Measurability: i's share of the mass along ŵ_i at its own firings, and the AUROC of
        # its projection, firings against background (i off, no neighbour firing).
        own_total = torch.zeros(m).index_add_(0, latent, own_write)
        beside = torch.where(fires, written_by_all, 0.0).sum(1)
        projection = unit[a:b] @ projection_base.T  # [m, n]: p_i(t)
        background = ~fires[:, pool] & (written_by_all[:, pool] == 0)
        chunk_auroc = binned_auroc(
            latent, projection[latent, position], projection[:, pool], background
        )
        # Absorbers: the mass each substitute writes along ŵ_i on i's absorbed positions, on
        # how many of them it fires, and how often it fires with i.
        gate = absorbed_at.float()
        weight = along * (near_by_latent @ gate.T).T
        on_absorbed = (fired_near @ gate.T).T.round().long()
        top_weight, top_column = weight.topk(min(n_absorbers, len(columns)), dim=1)
        top_latent = columns[top_column]

        value[a:b] = (total_absorbed / total.clamp_min(1e-30)).numpy()
        low[a:b], high[a:b] = chunk_low.numpy(), chunk_high.numpy()
        auroc[a:b] = chunk_auroc.numpy()
        own_share[a:b] = (own_total / (own_total + beside).clamp_min(1e-30)).numpy()
        n_firings[a:b] = count.numpy()
        absorbed_positions[a:b] = absorbed_count.numpy()
        # Whole rows to Python at once: indexing tensors absorber by absorber costs more than
        # the rest of the chunk at hundreds of thousands of latents.
        rows = zip(
            top_latent.tolist(),
            top_weight.tolist(),
            (top_weight / total.clamp_min(1e-30)[:, None]).tolist(),
            on_absorbed.gather(1, top_column).tolist(),
            cofiring.gather(1, top_column).tolist(),
            strict=True,
        )
        for latents, weights_row, shares_row, counts_row, cofiring_row in rows:
            absorbers.append(
                [
                    {
                        "feature_index": j,
                        "weight": round(w, 6),
                        "share": round(s, 6),
                        "count": k,
                        "cofiring": round(c, 4),
                    }
                    for j, w, s, k, c in zip(
                        latents, weights_row, shares_row, counts_row, cofiring_row, strict=True
                    )
                    if w > 0
                ]
            )
    reason = [_unmeasurable(*values) for values in zip(n_firings, own_share, auroc, strict=True)]
    unmeasured = np.array([r is not None for r in reason], dtype=bool)
    for array in (value, low, high):
        array[unmeasured] = np.nan
    return Absorption(
        value, low, high, reason, absorbed_positions, absorbers, auroc, own_share, n_firings
    )


def neighbour_graph(unit: Float[Tensor, "d_sae d"]) -> Tensor:
    """The pairs of distinct latents whose decoder cosine is at least NEIGHBOUR_COSINE, as a
    sparse CSR matrix [d_sae, d_sae] of their cosines: from square tiles on and above the
    diagonal, each tile standing for its mirror too (half the products of a full pass)."""
    d_sae = len(unit)
    size = max(1, math.isqrt(CHUNK_CELLS))
    rows, cols, cosines = [], [], []
    for a in range(0, d_sae, size):
        for b in range(a, d_sae, size):
            tile = unit[a : a + size] @ unit[b : b + size].T
            i, j = torch.nonzero(tile >= NEIGHBOUR_COSINE, as_tuple=True)
            cosine = tile[i, j]
            i, j = i + a, j + b
            if a == b:
                distinct = i != j
                rows.append(i[distinct])
                cols.append(j[distinct])
                cosines.append(cosine[distinct])
            else:
                rows += [i, j]
                cols += [j, i]
                cosines += [cosine, cosine]
    index = torch.stack([torch.cat(rows), torch.cat(cols)]) if rows else torch.zeros(2, 0)
    values = torch.cat(cosines) if cosines else torch.zeros(0)
    coo = torch.sparse_coo_tensor(index.long(), values, (d_sae, d_sae))
    return coo.coalesce().to_sparse_csr()


def _columns(f_by_latent: Tensor, columns: Int[Tensor, " c"]) -> tuple[Tensor, Tensor]:
    """The activations of the latents `columns` as sparse CSR matrices [n, c] and [c, n], from
    f by latent [d_sae, n]."""
    crow = f_by_latent.crow_indices()
    counts = crow[columns + 1] - crow[columns]
    row = torch.repeat_interleave(torch.arange(len(columns)), counts)
    entry = torch.repeat_interleave(crow[columns] - torch.cumsum(counts, 0) + counts, counts)
    entry += torch.arange(len(entry))
    n = f_by_latent.shape[1]
    by_latent = torch.sparse_coo_tensor(
        torch.stack([row, f_by_latent.col_indices()[entry]]),
        f_by_latent.values()[entry],
        (len(columns), n),
        is_coalesced=True,
    )
    return by_latent.t().coalesce().to_sparse_csr(), by_latent.to_sparse_csr()


def _ones(matrix: Tensor) -> Tensor:
    """A sparse CSR matrix's pattern, ones where it has an entry."""
    return torch.sparse_csr_tensor(
        matrix.crow_indices(), matrix.col_indices(), torch.ones_like(matrix.values()), matrix.shape
    )


def _unmeasurable(n_firings: int, own_share: float, auroc: float) -> str | None:
    """Why a latent's absorption cannot be read, or None."""
    if n_firings < MIN_FIRINGS:
        return f"fires on {n_firings} of the sampled positions; the measure needs {MIN_FIRINGS}"
    if not own_share >= MIN_OWN_SHARE:
        return (
            f"where it fires it writes {own_share:.0%} of the mass along its own direction and "
            f"its neighbours the rest: a correction riding on them, not a direction of its own"
        )
    if not auroc >= MIN_AUROC:
        return (
            f"its decoder direction does not single out where it fires: AUROC {auroc:.2f} of "
            f"the projection, firings against other positions (needs {MIN_AUROC})"
        )
    return None
