"""Reference matching (Farrell; the e2e-SAE paper's geometric analysis): each latent's closest
latent of another SAE by decoder cosine, and how the best cosines of an SAE's live latents are
spread. Exact, in chunks of rows so memory stays bounded whatever the two widths."""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from saescope.db.codec import cosine_edges
from saescope.db.records import ComparisonRecord, MatchColumns, StoredDecoder
from saescope.pipeline.saes import unit_rows

# Cosines per chunk of rows: a chunk's [rows, d_sae of the other SAE] product stays this small.
CHUNK_CELLS = 1 << 24


def best_matches(
    directions: Float[Tensor, "n d_in"], candidates: Float[Tensor, "m d_in"]
) -> tuple[np.ndarray, np.ndarray]:
    """For each row of `directions`, the index of its most similar row of `candidates` and that
    cosine (both sets of rows unit-normalised here)."""
    directions, candidates = unit_rows(directions.float()), unit_rows(candidates.float())
    rows = max(1, CHUNK_CELLS // max(len(candidates), 1))
    best, cosine = [], []
    for start in range(0, len(directions), rows):
        values, indices = (directions[start : start + rows] @ candidates.T).max(dim=1)
        best.append(indices)
        cosine.append(values)
    return torch.cat(best).numpy(), torch.cat(cosine).double().numpy()


def compare(sae: StoredDecoder, other: StoredDecoder) -> ComparisonRecord:
    """How `sae`'s latents are matched among `other`'s live ones; its live latents summarised.
    Where `other` has no live latent, nothing matches: every best cosine counts as 0."""
    live = np.flatnonzero(other.live)
    if len(live):
        found, cosine = best_matches(
            torch.from_numpy(sae.decoder), torch.from_numpy(other.decoder[live])
        )
    else:
        found, cosine = np.zeros(0, np.int64), np.zeros(len(sae.decoder))
    summarised = cosine[sae.live]
    counts, _ = np.histogram(np.clip(summarised, 0.0, 1.0), bins=cosine_edges())
    return ComparisonRecord(
        sae=sae.name,
        other=other.name,
        latents=len(summarised),
        share_above_0_9=float(np.mean(summarised > 0.9)) if len(summarised) else 0.0,
        share_above_0_8=float(np.mean(summarised > 0.8)) if len(summarised) else 0.0,
        median_best_cosine=float(np.median(summarised)) if len(summarised) else 0.0,
        histogram_counts=counts,
        same_model_and_hook=(sae.model, sae.hook) == (other.model, other.hook),
        matches=MatchColumns(
            feature_index=np.arange(len(found)),
            other_feature_index=live[found],
            cosine=cosine[: len(found)],
        ),
    )


def compare_both_ways(sae: StoredDecoder, other: StoredDecoder) -> list[ComparisonRecord]:
    return [compare(sae, other), compare(other, sae)]
