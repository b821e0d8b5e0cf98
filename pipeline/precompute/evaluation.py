"""Whole-SAE metrics on the evaluation contexts (the corpus's first): L0, reconstruction quality
and downstream loss, each with its standard error over the contexts.

Every metric is a ratio of sums over the contexts' tokens, so its standard error is the
jackknife's: the metric recomputed with each context left out in turn. Special tokens
(BOS/EOS/pad) keep their original activation in every run and are left out of L0 and the
reconstruction metrics, as they are left out of all feature statistics.

The contexts are read once (`evaluation_contexts`): one whole forward pass per batch gives the
activations the SAE reads and writes and the clean loss, and the SAE's active entries are
encoded once and kept sparse. Every later run (the SAE's reconstruction, zero ablation, each
threshold-ablation point, each precision tried) changes those entries' values, decodes them
sparsely and, where it needs the loss, splices the result into one forward pass. That pass
starts at the block of the hook the SAE writes: the blocks before it hand on what they handed on
in the clean pass (recorded then), once a replay of the first batch is checked to give the clean
losses.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from saescope.pipeline.activations import ActivationSource
from saescope.pipeline.errors import describe
from saescope.pipeline.models import (
    Upstream,
    activations_and_loss,
    flat_heads,
    hook_layer,
    recording_upstream,
)
from saescope.pipeline.notices import sparse_beta_notice_silenced
from saescope.pipeline.saes import row_chunks

logger = logging.getLogger(__name__)

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


@dataclass
class ActiveEntries:
    """An SAE's active entries on some rows (tokens), row by row (CSR order): what its decoder
    gets."""

    row_starts: Int[Tensor, " rows_plus_1"]
    rows: Int[Tensor, " entries"]
    latents: Int[Tensor, " entries"]
    values: Float[Tensor, " entries"]
    d_sae: int

    @classmethod
    def of(cls, f: Float[Tensor, "rows d_sae"]) -> ActiveEntries:
        """The entries of a dense matrix of activations."""
        row, latent = torch.nonzero(f > 0, as_tuple=True)
        return cls.from_entries(row, latent, f[row, latent], len(f), f.shape[1])

    @classmethod
    def encode(cls, sae, x: Float[Tensor, "rows d_in"]) -> ActiveEntries:
        """The entries of sae.encode(x), rows at a time where the SAE is wide."""
        d_sae = sae.W_dec.shape[0]
        parts = [cls.of(sae.encode(part).float()) for part in row_chunks(x.to(sae.dtype), d_sae)]
        offsets = np.cumsum([0] + [part.n_rows for part in parts[:-1]])
        rows = [part.rows + int(offset) for part, offset in zip(parts, offsets, strict=True)]
        return cls.from_entries(
            torch.cat(rows),
            torch.cat([part.latents for part in parts]),
            torch.cat([part.values for part in parts]),
            len(x),
            d_sae,
        )

    @classmethod
    def from_entries(
        cls, rows: Tensor, latents: Tensor, values: Tensor, n_rows: int, d_sae: int
    ) -> ActiveEntries:
        """From entries sorted by row."""
        counts = torch.bincount(rows, minlength=n_rows)
        row_starts = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        return cls(row_starts, rows, latents, values, d_sae)

    @property
    def n_rows(self) -> int:
        return len(self.row_starts) - 1

    def active_per_row(self, values: Float[Tensor, " entries"]) -> Int[Tensor, " rows"]:
        counts = torch.zeros(self.n_rows, dtype=torch.int64, device=values.device)
        return counts.index_add_(0, self.rows, (values > 0).long())

    def decode(self, sae, values: Float[Tensor, " entries"]) -> Float[Tensor, "rows d_out"]:
        """sae.decode of the rows with these values in place of the entries' own, in float32:
        the SAE's own decode, given its activations as a sparse matrix."""
        with sparse_beta_notice_silenced():
            f = torch.sparse_csr_tensor(
                self.row_starts, self.latents, values.to(sae.dtype), (self.n_rows, self.d_sae)
            )
        return sae.decode(f).float().reshape(self.n_rows, -1)


# The entries' values ↦ the values the decoder gets instead (0 removes an entry).
Transform = Callable[[ActiveEntries], Tensor]


def unchanged(active: ActiveEntries) -> Tensor:
    return active.values


@dataclass
class ContextBatch:
    """One forward pass's worth of evaluation contexts."""

    token_ids: Int[Tensor, "seq ctx"]
    written: Float[Tensor, "seq ctx d_out"]
    """the activations the SAE reconstructs (float32)"""
    special: Bool[Tensor, "seq ctx"]
    active: ActiveEntries
    """the SAE's entries on the ordinary tokens, in the order of written[~special]"""
    ordinary: Int[Tensor, " ordinary"]
    """the flat position of each ordinary token: every run writes through it without the
    host synchronisation a boolean mask costs"""
    clean_loss: Float[Tensor, "seq predictions"] | None
    """the model's own next-token losses (None without a language model)"""
    upstream: Upstream | None = None
    """what the blocks before the written hook's handed on, where spliced runs may start there"""


@dataclass
class EvaluationContexts:
    """The evaluation contexts, batch by batch, and the SAE's active entries on them over every
    ordinary token, from which the threshold-ablation knobs are set."""

    batches: list[ContextBatch]
    values: np.ndarray
    latents: np.ndarray
    per_token: np.ndarray
    """the active count of each ordinary token"""


def evaluation_contexts(
    sae, source: ActivationSource, n_sequences: int, device: str, quiet: bool
) -> EvaluationContexts:
    """The first `n_sequences` contexts, read and encoded once."""
    batches = []
    sequences = range(min(n_sequences, len(source.tokens)))
    read = tqdm(
        source.batches(device, sequences),
        total=-(-len(sequences) // source.forward_sequences),
        desc="evaluation: read and encode",
        disable=quiet,
    )
    model = source.language_model
    layer = hook_layer(source.written_hook) if model is not None else 0
    with recording_upstream(model, layer) as upstream:
        for start, token_ids in read:
            special = source.special(token_ids)
            clean_loss = None
            if model is not None:
                hooks = (source.hook, source.written_hook)
                (x, written), clean_loss = activations_and_loss(model, hooks, token_ids)
            else:
                x, written = source.read_with_output(start, token_ids)
            ordinary = torch.nonzero(~special.flatten()).flatten()
            active = ActiveEntries.encode(sae, x.float().flatten(0, 1)[ordinary])
            batch = ContextBatch(token_ids, written.float(), special, active, ordinary, clean_loss)
            batch.upstream = upstream.pop() if upstream else None
            batches.append(batch)
    if batches and batches[0].upstream is not None and not _replay_agrees(model, batches[0]):
        for batch in batches:
            batch.upstream = None
    entries = [batch.active for batch in batches]
    return EvaluationContexts(
        batches,
        torch.cat([a.values for a in entries]).cpu().numpy(),
        torch.cat([a.latents for a in entries]).cpu().numpy(),
        torch.cat([a.active_per_row(a.values) for a in entries]).cpu().numpy(),
    )


def _replay_agrees(model, batch: ContextBatch) -> bool:
    """Whether running the model from the recorded upstream gives the clean losses (to float32
    rounding): the check that this model's blocks can be skipped so."""
    try:
        with batch.upstream.replayed(model):
            loss = model(batch.token_ids, return_type="loss", loss_per_token=True)
    except Exception as error:  # any model whose forward the replay does not fit
        logger.info("spliced runs start at the first block (%s)", describe(error))
        return False
    agrees = torch.allclose(loss, batch.clean_loss, rtol=1e-5, atol=1e-6)
    if not agrees:
        logger.info("spliced runs start at the first block: skipping changes the loss")
    return agrees


def spliced_loss(
    source: ActivationSource, batch: ContextBatch, replacement: Float[Tensor, "seq ctx d_out"]
) -> Float[Tensor, "seq predictions"]:
    """The model's next-token losses with the activations at the hook the SAE writes replaced
    by `replacement` on the ordinary tokens (special tokens keep their own)."""
    special = batch.special.unsqueeze(-1)

    def write(activation: Tensor, hook) -> Tensor:
        y = flat_heads(activation)
        return torch.where(special, y, replacement.to(y.dtype)).reshape(activation.shape)

    model = source.language_model
    replayed = batch.upstream.replayed(model) if batch.upstream else contextlib.nullcontext()
    with replayed:
        return model.run_with_hooks(
            batch.token_ids,
            return_type="loss",
            loss_per_token=True,
            fwd_hooks=[(source.written_hook, write)],
        )


def measure(
    sae, source: ActivationSource, contexts: EvaluationContexts, transform: Transform, loss: bool
) -> SequenceTotals:
    """The totals of L0 and the reconstruction (and, with `loss` and a language model, the
    spliced run's losses as `sae`) with the SAE's active values changed by `transform`."""
    totals = SequenceTotals()
    for batch in contexts.batches:
        values = transform(batch.active)
        reconstruction = batch.written.clone()
        reconstruction.flatten(0, 1)[batch.ordinary] = batch.active.decode(sae, values)
        per_token = torch.zeros(batch.special.shape, dtype=torch.int64, device=values.device)
        per_token.flatten()[batch.ordinary] = batch.active.active_per_row(values)
        totals.add_reconstruction(batch.written, reconstruction, per_token, ~batch.special)
        if loss and batch.clean_loss is not None:
            totals.add_loss("sae", spliced_loss(source, batch, reconstruction))
    return totals


def evaluate(
    sae, source: ActivationSource, contexts: EvaluationContexts
) -> dict[str, float | int | None]:
    """L0 and reconstruction metrics, and, with a language model, its next-token cross-entropy
    clean, with the SAE's reconstruction spliced in where it writes, and with that hook
    zero-ablated; CE score = (CE_zero − CE_sae) / (CE_zero − CE_clean)."""
    totals = measure(sae, source, contexts, unchanged, loss=True)
    for batch in contexts.batches:
        if batch.clean_loss is not None:
            totals.add_loss("clean", batch.clean_loss)
            totals.add_loss("zero", spliced_loss(source, batch, torch.zeros_like(batch.written)))
    return totals.metrics()
