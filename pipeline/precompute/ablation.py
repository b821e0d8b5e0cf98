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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from saescope.db.codec import histogram_edges
from saescope.pipeline.activations import ActivationSource
from saescope.pipeline.config import ACTIVATION_CELLS
from saescope.pipeline.precompute.accumulators import FeatureStatsResult
from saescope.pipeline.precompute.evaluation import SequenceTotals, encode_decode, splice_hooks
from saescope.pipeline.saes import row_chunks

TARGET_FRACTIONS = (1.0, 0.85, 0.7, 0.55, 0.4, 0.25)
# Each rule, and what it removes (stored beside its points).
RULES = {
    "global": "every activation below one threshold",
    "lowest_k": "the k smallest activations of each token",
    "fraction_of_max": "activations below a fraction of their latent's max",
    "quantile": "activations below a quantile of their latent's active values",
}

# f ↦ the activations the decoder gets instead.
Transform = Callable[[Tensor], Tensor]
# A removal rule makes several dense copies of f: rows are taken this many (token, latent) cells
# at a time, so a wide SAE's copies stay small.
TRANSFORM_CELLS = ACTIVATION_CELLS // 8


@dataclass
class AblationContexts:
    """The ablation contexts, batch by batch, and the SAE's active entries on them (special
    tokens aside), from which each rule's knob is set."""

    batches: list[tuple[Tensor, Tensor, Tensor]]
    """(token ids, the activations the SAE reads, those it writes, special-token mask) per
    forward pass"""
    values: np.ndarray
    """the active values, over every ordinary token"""
    latents: np.ndarray
    """the latent of each"""
    per_token: np.ndarray
    """the active count of each ordinary token"""


def ablation_contexts(
    sae, source: ActivationSource, n_sequences: int, device: str
) -> AblationContexts:
    batches, values, latents, per_token = [], [], [], []
    for start, token_ids in source.batches(device, range(min(n_sequences, len(source.tokens)))):
        x, written = source.read_with_output(start, token_ids)
        x, written = x.float(), written.float()
        special = source.special(token_ids)
        for part in row_chunks(x[~special], sae.W_dec.shape[0]):
            f = sae.encode(part).float()
            rows, cols = torch.nonzero(f > 0, as_tuple=True)
            values.append(f[rows, cols].cpu().numpy())
            latents.append(cols.cpu().numpy())
            per_token.append((f > 0).sum(1).cpu().numpy())
        batches.append((token_ids, x, written, special))
    return AblationContexts(
        batches, np.concatenate(values), np.concatenate(latents), np.concatenate(per_token)
    )


def measure(
    sae,
    source: ActivationSource,
    contexts: AblationContexts,
    transform: Transform,
    with_loss: bool = True,
) -> dict[str, float | None]:
    """L0, MSE, explained variance and (with a language model and `with_loss`) cross-entropy
    with the SAE's activations changed by `transform` before decoding."""
    totals = SequenceTotals()
    model = source.language_model if with_loss else None
    for token_ids, x, written, special in contexts.batches:
        parts, active = [], []
        for part in row_chunks(x[~special], sae.W_dec.shape[0], TRANSFORM_CELLS):
            reconstruction, count = encode_decode(sae, part, transform)
            parts.append(reconstruction)
            active.append(count)
        reconstruction = written.clone()
        reconstruction[~special] = torch.cat(parts)
        per_token = torch.zeros(special.shape, dtype=torch.int64, device=x.device)
        per_token[~special] = torch.cat(active)
        totals.add_reconstruction(written, reconstruction, per_token, ~special)
        if model is not None:

            def replace(x: Tensor, y: Tensor, reconstruction=reconstruction) -> Tensor:
                return reconstruction.to(y.dtype)

            hooks = splice_hooks(source.hook, source.written_hook, replace, special)
            loss = model.run_with_hooks(
                token_ids, return_type="loss", loss_per_token=True, fwd_hooks=hooks
            )
            totals.add_loss("sae", loss)
    metrics = totals.metrics()
    return {
        "l0": metrics["eval_l0"],
        "mse": metrics["mse"],
        "explained_variance": metrics["explained_variance"],
        "ce": metrics["ce_sae"],
    }


def threshold_ablation(
    sae, source: ActivationSource, contexts: AblationContexts, stats: FeatureStatsResult
) -> list[dict]:
    """Every rule's points, as the database stores them: [{name, rule, points: [{threshold, l0,
    mse, explained_variance, ce}]}], the knob named `threshold` whatever the rule."""
    n_tokens = max(len(contexts.per_token), 1)
    kept = [round(contexts.values.size * fraction) for fraction in TARGET_FRACTIONS[1:]]
    maximum = torch.from_numpy(stats.max).float()
    ranks = ActivationRanks(stats)
    unchanged = {"threshold": 0.0, **measure(sae, source, contexts, lambda f: f)}
    report = []
    for rule in RULES:
        points = [unchanged]
        for knob in _knobs(rule, kept, n_tokens, contexts, stats.max, ranks):
            transform = _transform(rule, knob, maximum, ranks)
            points.append({"threshold": knob, **measure(sae, source, contexts, transform)})
        report.append({"name": rule, "rule": RULES[rule], "points": points})
    return report


def _transform(rule: str, knob: float, maximum: Tensor, ranks: ActivationRanks) -> Transform:
    def transformed(f: Tensor) -> Tensor:
        if rule == "lowest_k":
            return _drop_lowest(f, int(knob))
        if rule == "global":
            keep = f >= knob
        elif rule == "fraction_of_max":
            keep = f >= knob * maximum.to(f.device)
        else:
            keep = ranks.of_tensor(f) >= knob
        return torch.where(keep, f, 0.0)

    return transformed


def _drop_lowest(f: Float[Tensor, "tokens d_sae"], k: int) -> Float[Tensor, "tokens d_sae"]:
    """Each token's k smallest active values set to 0 (all of them where it has k or fewer)."""
    if k == 0:
        return f
    active = f > 0
    ranked = torch.where(active, f, torch.inf)
    kth = ranked.kthvalue(min(k, f.shape[1]), dim=1, keepdim=True).values
    return torch.where(active & (f > kth), f, 0.0)


def _knobs(
    rule: str,
    kept: list[int],
    n_tokens: int,
    contexts: AblationContexts,
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

    def of_tensor(self, f: Float[Tensor, "tokens d_sae"]) -> Float[Tensor, "tokens d_sae"]:
        """F_i of each active entry of f; 0 where inactive."""
        rows, cols = torch.nonzero(f > 0, as_tuple=True)
        ranks = self.of(cols.cpu().numpy(), f[rows, cols].double().cpu().numpy())
        out = torch.zeros(f.shape, dtype=torch.float64, device=f.device)
        out[rows, cols] = torch.from_numpy(ranks).to(f.device)
        return out
