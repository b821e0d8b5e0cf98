"""Whole-SAE metrics on a subset of contexts: reconstruction quality and downstream loss.

Special tokens (BOS/EOS/pad) keep their original activation in every run and are left out of the
reconstruction metrics, as they are left out of all feature statistics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from saescope.pipeline.activations import ActivationSource
from saescope.pipeline.models import flat_heads
from saescope.pipeline.saes import row_chunks

# Synthetic activations are evaluated this many rows at a time.
RECONSTRUCTION_ROWS = 1 << 16


class ReconstructionTotals:
    """Running sums for MSE (mean over tokens and dimensions) and explained variance
    1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²."""

    def __init__(self) -> None:
        self.sse = 0.0
        self.sum_sq = 0.0
        self.count = 0
        self.x_sum: Tensor | None = None

    def add(self, x: Tensor, reconstruction: Tensor) -> None:
        x = x.double().reshape(-1, x.shape[-1])
        self.sse += float((reconstruction.double().reshape(x.shape) - x).pow(2).sum())
        self.sum_sq += float(x.pow(2).sum())
        self.count += x.shape[0]
        self.x_sum = x.sum(0) if self.x_sum is None else self.x_sum + x.sum(0)

    def metrics(self) -> dict[str, float | int | None]:
        if self.x_sum is None:
            return {"eval_tokens": 0, "mse": 0.0, "explained_variance": None}
        variance = self.sum_sq - float(self.x_sum.pow(2).sum()) / self.count
        return {
            "eval_tokens": self.count,
            "mse": self.sse / (self.count * len(self.x_sum)),
            "explained_variance": 1.0 - self.sse / variance if variance > 0 else None,
        }


def reconstruct(sae, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
    """sae(x) in float32, rows at a time where the SAE is wide."""
    rows = x.reshape(-1, x.shape[-1]).to(sae.dtype)
    parts = [sae(part).float() for part in row_chunks(rows, sae.W_dec.shape[0])]
    return torch.cat(parts).reshape(*x.shape[:-1], -1)


def splice_hooks(
    reads: str, writes: str, replace: Callable[[Tensor, Tensor], Tensor], special: Tensor
) -> list[tuple[str, Callable]]:
    """Forward hooks that replace the activations at `writes` by replace(x, y), x those at
    `reads` and y those at `writes` (heads flattened; the same hook for an SAE, two for a
    transcoder); special tokens (`special`, [batch, ctx]) keep their own."""
    read: list[Tensor] = []

    def capture(activation: Tensor, hook) -> None:
        read.append(flat_heads(activation))

    def write(activation: Tensor, hook) -> Tensor:
        y = flat_heads(activation)
        replacement = replace(read[-1] if read else y, y).to(y.dtype)
        return torch.where(special.unsqueeze(-1), y, replacement).reshape(activation.shape)

    return ([(reads, capture)] if reads != writes else []) + [(writes, write)]


def evaluate(
    sae, source: ActivationSource, n_sequences: int, batch_size: int, quiet: bool
) -> dict[str, float | None]:
    """The per-SAE metrics on the first `n_sequences` contexts: with the model's cross-entropy
    where the source has a language model, reconstruction alone where it has none."""
    if source.language_model is None:
        tokens = torch.from_numpy(source.tokens[:n_sequences])
        x = source.read(0, tokens)
        return evaluate_reconstruction(sae, x.reshape(-1, x.shape[-1]))
    return evaluate_sae(
        source.language_model,
        sae,
        (source.hook, source.written_hook),
        torch.from_numpy(source.tokens[:n_sequences]),
        source.special_ids,
        batch_size,
        quiet,
    )


def evaluate_sae(
    model,
    sae,
    hooks: tuple[str, str],
    tokens: Tensor,
    special_ids: set[int],
    batch_size: int,
    quiet: bool,
) -> dict[str, float | None]:
    """Reconstruction metrics, and the model's next-token cross-entropy clean, with the SAE's
    reconstruction spliced in where it writes (`hooks`: where it reads, where it writes), and
    with that hook zero-ablated; CE score = (CE_zero − CE_sae) / (CE_zero − CE_clean)."""
    device = next(sae.parameters()).device
    special = torch.tensor(sorted(special_ids), dtype=torch.int64, device=device)
    totals = ReconstructionTotals()
    losses = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_predictions = 0

    for start in tqdm(range(0, len(tokens), batch_size), desc="evaluate", disable=quiet):
        batch = tokens[start : start + batch_size].to(device)
        mask = torch.isin(batch, special)

        def reconstructed(x: Tensor, y: Tensor, mask=mask) -> Tensor:
            reconstruction = reconstruct(sae, x)
            totals.add(y[~mask], reconstruction[~mask])
            return reconstruction

        def zero(x: Tensor, y: Tensor) -> Tensor:
            return torch.zeros_like(y)

        n = batch.shape[0] * (batch.shape[1] - 1)
        losses["clean"] += float(model(batch, return_type="loss")) * n
        for name, replace in (("sae", reconstructed), ("zero", zero)):
            fwd_hooks = splice_hooks(*hooks, replace, mask)
            loss = model.run_with_hooks(batch, return_type="loss", fwd_hooks=fwd_hooks)
            losses[name] += float(loss) * n
        n_predictions += n

    ce = {key: value / max(n_predictions, 1) for key, value in losses.items()}
    gap = ce["zero"] - ce["clean"]
    return {
        **totals.metrics(),
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero": ce["zero"],
        "ce_score": (ce["zero"] - ce["sae"]) / gap if abs(gap) > 1e-12 else None,
    }


def evaluate_reconstruction(sae, activations: Tensor) -> dict:
    """Reconstruction metrics alone, for activations that come without a language model."""
    totals = ReconstructionTotals()
    for chunk in activations.split(RECONSTRUCTION_ROWS):
        totals.add(chunk, reconstruct(sae, chunk))
    return {**totals.metrics(), "ce_clean": None, "ce_sae": None, "ce_zero": None, "ce_score": None}
