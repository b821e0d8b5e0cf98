"""Whole-SAE metrics on the evaluation contexts (the corpus's first): L0, reconstruction quality
and downstream loss, each with its standard error over the contexts.

Every metric is a ratio of sums over the contexts' tokens, so its standard error is the
jackknife's: the metric recomputed with each context left out in turn. Special tokens
(BOS/EOS/pad) keep their original activation in every run and are left out of L0 and the
reconstruction metrics, as they are left out of all feature statistics.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from saescope.pipeline.activations import ActivationSource
from saescope.pipeline.models import flat_heads
from saescope.pipeline.saes import row_chunks

# Synthetic activations are evaluated this many contexts at a time.
RECONSTRUCTION_CONTEXTS = 512
# The metrics the SAE's row stores, each with a standard error (column NAME_se).
WITH_ERRORS = (
    "eval_l0",
    "mse",
    "explained_variance",
    "ce_clean",
    "ce_sae",
    "ce_zero",
    "ce_score",
)


class SequenceTotals:
    """Per evaluation context: its counted tokens, active latents, squared reconstruction error,
    squared norm and vector sum of the activations, and summed next-token losses."""

    def __init__(self) -> None:
        self._parts: dict[str, list[np.ndarray]] = defaultdict(list)

    def add_reconstruction(
        self,
        x: Float[Tensor, "seq ctx d"],
        reconstruction: Float[Tensor, "seq ctx d"],
        active: Float[Tensor, "seq ctx"],
        counted: Bool[Tensor, "seq ctx"],
    ) -> None:
        keep = counted.unsqueeze(-1)
        x = torch.where(keep, x.double(), 0.0)
        error = torch.where(keep, reconstruction.double() - x, 0.0)
        for name, value in (
            ("tokens", counted.sum(1)),
            ("active", torch.where(counted, active, 0).sum(1)),
            ("sse", error.pow(2).sum((1, 2))),
            ("sum_sq", x.pow(2).sum((1, 2))),
            ("x_sum", x.sum(1)),
        ):
            self._parts[name].append(value.detach().double().cpu().numpy())

    def add_loss(self, name: str, loss: Float[Tensor, "seq predictions"]) -> None:
        """Next-token losses of a run (`clean`, `sae` or `zero`), one per prediction."""
        self._parts[name].append(loss.detach().double().sum(1).cpu().numpy())
        self._parts[f"{name}_predictions"].append(np.full(len(loss), float(loss.shape[1])))

    def per_sequence(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in self._parts.items()}

    def metrics(self) -> dict[str, float | int | None]:
        """Each metric over all contexts, its standard error (NAME_se) over them, and how many
        tokens and contexts they are."""
        sums = self.per_sequence()
        if not sums:
            return {"eval_tokens": 0, **{name: None for name in WITH_ERRORS}}
        totals = {name: values.sum(0) for name, values in sums.items()}
        whole = _metrics(totals)
        n = len(sums["tokens"])
        left_out = _metrics({name: totals[name] - sums[name] for name in sums})
        report: dict[str, float | int | None] = {
            "eval_tokens": int(totals["tokens"]),
            "eval_sequences": n,
        }
        for name in WITH_ERRORS:
            value = whole.get(name)
            report[name] = None if value is None or not np.isfinite(value) else float(value)
            spread = left_out.get(name)
            se = (
                float(np.sqrt((n - 1) / n * np.sum((spread - spread.mean()) ** 2)))
                if report[name] is not None and n > 1 and np.isfinite(spread).all()
                else None
            )
            report[f"{name}_se"] = se
        report["eval_l0"] = report["eval_l0"] or 0.0
        report["mse"] = report["mse"] or 0.0
        return report


def _metrics(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The metrics from summed totals (scalars, or arrays of leave-one-out totals)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        tokens = t["tokens"]
        variance = t["sum_sq"] - (t["x_sum"] ** 2).sum(-1) / tokens
        out = {
            "eval_l0": t["active"] / tokens,
            "mse": t["sse"] / (tokens * t["x_sum"].shape[-1]),
            "explained_variance": np.where(variance > 0, 1.0 - t["sse"] / variance, np.nan),
        }
        ce = {
            name: t[name] / t[f"{name}_predictions"]
            for name in ("clean", "sae", "zero")
            if name in t
        }
        out |= {f"ce_{name}": value for name, value in ce.items()}
        if len(ce) == 3:
            gap = ce["zero"] - ce["clean"]
            out["ce_score"] = np.where(np.abs(gap) > 1e-12, (ce["zero"] - ce["sae"]) / gap, np.nan)
    return out


def encode_decode(
    sae, x: Float[Tensor, "*rows d_in"], transform: Callable[[Tensor], Tensor] | None = None
) -> tuple[Float[Tensor, "*rows d_in"], Int[Tensor, "*rows"]]:
    """The SAE's reconstruction of x in float32, with its activations changed by `transform`
    before decoding, and the latents active on each row; rows at a time where it is wide."""
    rows = x.reshape(-1, x.shape[-1]).to(sae.dtype)
    reconstructed, active = [], []
    for part in row_chunks(rows, sae.W_dec.shape[0]):
        f = sae.encode(part).float()
        if transform is not None:
            f = transform(f)
        reconstructed.append(sae.decode(f.to(sae.dtype)).float())
        active.append((f > 0).sum(1))
    return (
        torch.cat(reconstructed).reshape(*x.shape[:-1], -1),
        torch.cat(active).reshape(x.shape[:-1]),
    )


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
) -> dict[str, float | int | None]:
    """The per-SAE metrics on the first `n_sequences` contexts: with the model's cross-entropy
    where the source has a language model, reconstruction alone where it has none."""
    tokens = torch.from_numpy(source.tokens[:n_sequences])
    if source.language_model is None:
        return evaluate_reconstruction(sae, source.read(0, tokens))
    return evaluate_sae(
        source.language_model,
        sae,
        (source.hook, source.written_hook),
        tokens,
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
) -> dict[str, float | int | None]:
    """L0 and reconstruction metrics, and the model's next-token cross-entropy clean, with the
    SAE's reconstruction spliced in where it writes (`hooks`: where it reads, where it writes),
    and with that hook zero-ablated; CE score = (CE_zero − CE_sae) / (CE_zero − CE_clean)."""
    device = next(sae.parameters()).device
    special = torch.tensor(sorted(special_ids), dtype=torch.int64, device=device)
    totals = SequenceTotals()

    for start in tqdm(range(0, len(tokens), batch_size), desc="evaluate", disable=quiet):
        batch = tokens[start : start + batch_size].to(device)
        mask = torch.isin(batch, special)

        def reconstructed(x: Tensor, y: Tensor, mask=mask) -> Tensor:
            reconstruction, active = encode_decode(sae, x)
            totals.add_reconstruction(y, reconstruction, active, ~mask)
            return reconstruction

        def zero(x: Tensor, y: Tensor) -> Tensor:
            return torch.zeros_like(y)

        totals.add_loss("clean", model(batch, return_type="loss", loss_per_token=True))
        for name, replace in (("sae", reconstructed), ("zero", zero)):
            fwd_hooks = splice_hooks(*hooks, replace, mask)
            loss = model.run_with_hooks(
                batch, return_type="loss", loss_per_token=True, fwd_hooks=fwd_hooks
            )
            totals.add_loss(name, loss)
    return totals.metrics()


def evaluate_reconstruction(sae, activations: Float[Tensor, "seq ctx d"]) -> dict:
    """L0 and reconstruction metrics alone, for activations that come without a language
    model."""
    totals = SequenceTotals()
    for chunk in activations.split(RECONSTRUCTION_CONTEXTS):
        reconstruction, active = encode_decode(sae, chunk)
        totals.add_reconstruction(
            chunk, reconstruction, active, torch.ones(chunk.shape[:-1], dtype=torch.bool)
        )
    return totals.metrics()
