"""Reference matching (Farrell; the e2e-SAE paper's geometric analysis): each latent's closest
latent of another SAE by decoder cosine, and how the best cosines of an SAE's live latents are
spread. Exact, in chunks of rows so memory stays bounded whatever the two widths; each chunk's
cosines serve both directions."""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from saescope.db.codec import cosine_edges
from saescope.db.records import ComparisonRecord, MatchColumns, StoredDecoder
from saescope.pipeline.saes import unit_rows

# Cosines per chunk of rows: a chunk's [rows, d_sae of the other SAE] product stays this small.
CHUNK_CELLS = 1 << 24
# The chance baseline's random decoders, the same for every build.
CHANCE_SEED = 0


def best_matches(
    directions: Float[Tensor, "n d_in"],
    candidates: Float[Tensor, "m d_in"],
    live_directions: Bool[Tensor, " n"],
    live_candidates: Bool[Tensor, " m"],
    device: str = "cpu",
    progress: str | None = None,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Both ways, each row's most similar live row of the other set by cosine: (index, cosine)
    for every row of `directions` among the live `candidates`, and for every row of
    `candidates` among the live `directions`; -inf where the other set has no live row.
    Computed on `device`, returned on the CPU; a progress bar named `progress` if given."""
    directions, candidates = (unit_rows(x.to(device).float()) for x in (directions, candidates))
    live_directions, live_candidates = live_directions.to(device), live_candidates.to(device)
    rows = max(1, CHUNK_CELLS // max(len(candidates), 1))
    forward_index, forward_cosine = [], []
    back_cosine = torch.full((len(candidates),), -torch.inf, device=device)
    back_index = torch.zeros(len(candidates), dtype=torch.int64, device=device)
    chunks = range(0, len(directions), rows)
    for start in tqdm(chunks, desc=progress, disable=progress is None):
        cosines = directions[start : start + rows] @ candidates.T
        live_rows = live_directions[start : start + rows]
        if live_rows.any():
            values, indices = cosines[live_rows].max(dim=0)
            better = values > back_cosine
            back_cosine = torch.where(better, values, back_cosine)
            rows_index = torch.nonzero(live_rows).flatten() + start
            back_index = torch.where(better, rows_index[indices], back_index)
        cosines[:, ~live_candidates] = -torch.inf
        values, indices = cosines.max(dim=1)
        forward_index.append(indices)
        forward_cosine.append(values)
    forward = (torch.cat(forward_index).cpu(), torch.cat(forward_cosine).cpu())
    return forward, (back_index.cpu(), back_cosine.cpu())


def chance_best_cosines(
    n_directions: int, n_candidates: int, d_in: int, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """What matching gives by chance: the best cosines, each way, between `n_directions` and
    `n_candidates` random unit directions in `d_in` dimensions (isotropic Gaussian rows)."""
    generator = torch.Generator().manual_seed(CHANCE_SEED)
    directions = torch.randn(n_directions, d_in, generator=generator)
    candidates = torch.randn(n_candidates, d_in, generator=generator)
    (_, forward), (_, back) = best_matches(
        directions,
        candidates,
        torch.ones(n_directions, dtype=torch.bool),
        torch.ones(n_candidates, dtype=torch.bool),
        device,
    )
    return forward.double().numpy(), back.double().numpy()


def compare_both_ways(
    sae: StoredDecoder, other: StoredDecoder, device: str = "cpu", quiet: bool = True
) -> list[ComparisonRecord]:
    """How each SAE's latents are matched among the other's live ones, each way, beside what
    random decoders of the same shapes (live latents only) give."""
    forward, back = best_matches(
        torch.from_numpy(sae.decoder),
        torch.from_numpy(other.decoder),
        torch.from_numpy(sae.live),
        torch.from_numpy(other.live),
        device,
        None if quiet else f"matching {sae.name} and {other.name}",
    )
    n_live, n_other_live = int(sae.live.sum()), int(other.live.sum())
    if n_live and n_other_live:
        chance = chance_best_cosines(n_live, n_other_live, sae.decoder.shape[1], device)
    else:
        chance = (np.zeros(n_live), np.zeros(n_other_live))
    return [_record(sae, other, *forward, chance[0]), _record(other, sae, *back, chance[1])]


def _record(
    sae: StoredDecoder, other: StoredDecoder, index: Tensor, cosine: Tensor, chance: np.ndarray
) -> ComparisonRecord:
    """`sae`'s matches in `other`, and its live latents summarised beside `chance`, the best
    cosines random decoders give. Where `other` has no live latent, nothing matches: no match
    is stored and every best cosine counts as 0."""
    found = bool(other.live.any())
    cosine = cosine.double().numpy() if found else np.zeros(len(sae.live))
    summarised = cosine[sae.live]
    counts, _ = np.histogram(np.clip(summarised, 0.0, 1.0), bins=cosine_edges())
    chance_counts, _ = np.histogram(np.clip(chance, 0.0, 1.0), bins=cosine_edges())
    chance_max = float(chance.max()) if len(chance) else 1.0
    stored = slice(None) if found else slice(0)
    return ComparisonRecord(
        sae=sae.name,
        other=other.name,
        latents=len(summarised),
        share_above_0_9=float(np.mean(summarised > 0.9)) if len(summarised) else 0.0,
        share_above_0_8=float(np.mean(summarised > 0.8)) if len(summarised) else 0.0,
        median_best_cosine=float(np.median(summarised)) if len(summarised) else 0.0,
        histogram_counts=counts,
        same_model_and_hook=(sae.model, sae.hook) == (other.model, other.hook),
        chance_median_best_cosine=float(np.median(chance)) if len(chance) else 0.0,
        chance_max_cosine=chance_max,
        chance_histogram_counts=chance_counts,
        latents_above_chance=int((summarised > chance_max).sum()),
        matches=MatchColumns(
            feature_index=np.arange(len(sae.live))[stored],
            other_feature_index=index.numpy()[stored],
            cosine=cosine[stored],
        ),
    )
