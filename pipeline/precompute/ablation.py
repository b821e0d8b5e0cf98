"""Threshold ablation (Riggs and Brinkmann, 2024): remove an SAE's lowest activations in four ways,
at matched L0, and measure what the reconstruction and the model's loss do.

Rules, each zeroing some active f_i(t) before decoding:

    global            f_i(t) < θ                 one threshold for every latent
    lowest_k          the k smallest active values of each token
    fraction_of_max   f_i(t) < α·max_i           max_i over the build's pass
    quantile          F_i(f_i(t)) < q            F_i the distribution of i's active values (pass)

Each rule's knob (θ, k, α, q) is set so that L0 reaches L0 × TARGET_FRACTIONS on the ablation
contexts (the build's evaluation contexts); every point reports the L0 reached, MSE,
explained variance and, with a language model, the cross-entropy with the changed reconstruction
spliced in (special tokens keep their activation). The knob-0 point is the SAE itself, shared by
the rules: its MSE, explained variance and CE are the SAE's evaluation figures, its L0 that of the
evaluation contexts.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from saescope.db.codec import histogram_edges
from saescope.pipeline.activations import ActivationSource
from saescope.pipeline.precompute.accumulators import FeatureStatsResult
from saescope.pipeline.precompute.evaluation import (
    ActiveEntries,
    EvaluationContexts,
    Transform,
    measure,
)

TARGET_FRACTIONS = (1.0, 0.85, 0.7, 0.55, 0.4, 0.25)
# Each rule, and what it removes (stored beside its points).
RULES = {
    "global": "every activation below one threshold",
    "lowest_k": "the k smallest activations of each token",
    "fraction_of_max": "activations below a fraction of their latent's max",
    "quantile": "activations below a quantile of their latent's active values",
}


def threshold_ablation(
    sae,
    source: ActivationSource,
    contexts: EvaluationContexts,
    stats: FeatureStatsResult,
    evaluation: dict,
    quiet: bool,
) -> list[dict]:
    """Every rule's points, as the database stores them: [{name, rule, points: [{threshold, l0,
    mse, explained_variance, ce}]}], the knob named `threshold` whatever the rule; the first
    point is the SAE's `evaluation`."""
    n_tokens = max(len(contexts.per_token), 1)
    kept = [round(contexts.values.size * fraction) for fraction in TARGET_FRACTIONS[1:]]
    maximum = torch.from_numpy(stats.max).float()
    ranks = ActivationRanks(stats)
    unchanged = {
        "threshold": 0.0,
        "l0": evaluation["eval_l0"],
        "mse": evaluation["mse"],
        "explained_variance": evaluation["explained_variance"],
        "ce": evaluation["ce_sae"],
    }
    report = []
    progress = tqdm(total=len(RULES) * len(kept), desc="threshold ablation", disable=quiet)
    with progress:
        for rule in RULES:
            progress.set_description(f"threshold ablation: {rule}")
            points = [unchanged]
            for knob in _knobs(rule, kept, n_tokens, contexts, stats.max, ranks):
                transform = _transform(rule, knob, maximum, ranks)
                metrics = measure(sae, source, contexts, transform, loss=True).metrics()
                points.append(
                    {
                        "threshold": knob,
                        "l0": metrics["eval_l0"],
                        "mse": metrics["mse"],
                        "explained_variance": metrics["explained_variance"],
                        "ce": metrics["ce_sae"],
                    }
                )
                progress.update()
            report.append({"name": rule, "rule": RULES[rule], "points": points})
    return report


def _transform(rule: str, knob: float, maximum: Tensor, ranks: ActivationRanks) -> Transform:
    def transformed(active: ActiveEntries) -> Tensor:
        values = active.values
        if rule == "lowest_k":
            return _drop_lowest(active, int(knob))
        if rule == "global":
            keep = values >= knob
        elif rule == "fraction_of_max":
            keep = values >= knob * maximum.to(values.device)[active.latents]
        else:
            keep = ranks.of_entries(active) >= knob
        return torch.where(keep, values, 0.0)

    return transformed


def _drop_lowest(active: ActiveEntries, k: int) -> Float[Tensor, " entries"]:
    """Each row's k smallest active values set to 0 (all of them where it has k or fewer; values
    tied with the k-th smallest go too)."""
    if k == 0 or len(active.values) == 0:
        return active.values
    # Sorted by value within each row: a stable sort by value, then one by row.
    by_value = torch.sort(active.values, stable=True).indices
    by_row = by_value[torch.sort(active.rows[by_value], stable=True).indices]
    ordered = active.values[by_row]
    counts = active.row_starts[1:] - active.row_starts[:-1]
    kth = ordered[(active.row_starts[:-1] + k - 1).clamp_max(len(ordered) - 1)]
    kth = torch.where(counts >= k, kth, torch.inf)
    return torch.where(active.values > kth[active.rows], active.values, 0.0)


def _knobs(
    rule: str,
    kept: list[int],
    n_tokens: int,
    contexts: EvaluationContexts,
    maximum: np.ndarray,
    ranks: ActivationRanks,
) -> list[float]:
    """The knob at which the rule keeps each number of the contexts' active values (lowest_k:
    the k whose mean L0 comes closest)."""
    if rule == "lowest_k":
        ks = np.arange(int(contexts.per_token.max(initial=0)) + 1)
        l0 = np.maximum(contexts.per_token[None, :] - ks[:, None], 0).mean(1)
        return [float(ks[np.argmin(np.abs(l0 * n_tokens - target))]) for target in kept]
    if rule == "global":
        score = contexts.values
    elif rule == "fraction_of_max":
        score = contexts.values / np.maximum(maximum[contexts.latents], 1e-30)
    else:
        score = ranks.of(contexts.latents, contexts.values)
    ordered = np.sort(score)[::-1]
    # The knob is the score of the last value kept: those at or above it stay.
    return [float(ordered[max(count, 1) - 1]) if len(ordered) else 0.0 for count in kept]


class ActivationRanks:
    """F_i(v): the share of latent i's active values over the build's pass below v, from its fine
    histogram, interpolated geometrically inside a bin as `analysis.interpolated_quantiles`
    does."""

    def __init__(self, stats: FeatureStatsResult) -> None:
        self.histogram = stats.histogram
        # In the histogram's int32 (no count reaches 2**31), and in place: at 262,144 latents an
        # int64 copy and its temporary would take 2 GB.
        self.below = np.cumsum(stats.histogram, axis=1, dtype=stats.histogram.dtype)
        self.below -= stats.histogram
        self.total = np.maximum(stats.histogram.sum(1), 1)
        self.low, self.high = stats.min, stats.max
        self.edges = histogram_edges()

    def of(self, latents: Int[np.ndarray, " n"], values: Float[np.ndarray, " n"]) -> np.ndarray:
        n_bins = self.histogram.shape[1]
        values = values.astype(np.float64)
        bin = np.searchsorted(self.edges, values, side="right")
        low, high = self.low[latents], self.high[latents]
        lower = np.where(bin == 0, low, self.edges[np.maximum(bin - 1, 0)]).clip(low, high)
        upper = np.where(bin == n_bins - 1, high, self.edges[np.minimum(bin, n_bins - 2)])
        upper = upper.clip(low, high)
        with np.errstate(divide="ignore", invalid="ignore"):
            fraction = np.log(np.maximum(values, 1e-30) / np.maximum(lower, 1e-30)) / np.log(
                np.maximum(upper, 1e-30) / np.maximum(lower, 1e-30)
            )
        fraction = np.where(upper > lower, np.clip(fraction, 0.0, 1.0), 1.0)
        inside = self.below[latents, bin] + fraction * self.histogram[latents, bin]
        return inside / self.total[latents]

    def of_entries(self, active: ActiveEntries) -> Float[Tensor, " entries"]:
        """F_i of each active entry."""
        ranks = self.of(active.latents.cpu().numpy(), active.values.double().cpu().numpy())
        return torch.from_numpy(ranks).to(active.values.device)
