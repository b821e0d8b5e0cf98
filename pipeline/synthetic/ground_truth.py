"""How well an SAE's decoder recovers the true features of synthetic data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from saescope.pipeline.saes import unit_rows


def mean_max_cosine(directions: Tensor, decoder: Tensor) -> float:
    """MMCS: mean over ground-truth directions of the best decoder cosine (Sharkey et al., 2022)."""
    return float((directions @ unit_rows(decoder).T).max(dim=1).values.mean())


@dataclass
class GroundTruthMatch:
    """Per SAE latent: the closest ground-truth feature, and whether it is closer to the sum of
    two ground-truth features than to any single one (a composed feature)."""

    best: np.ndarray  # [d_sae] index of the best ground-truth feature
    cosine: np.ndarray  # [d_sae]
    pair: np.ndarray  # [d_sae, 2] the best pair
    pair_cosine: np.ndarray  # [d_sae]
    mmcs: float
    recovered: float
    """share of ground-truth features with a latent at decoder cosine > 0.9"""

    @property
    def composed(self) -> np.ndarray:
        return self.pair_cosine > self.cosine


def match_ground_truth(directions: Tensor, decoder: Tensor) -> GroundTruthMatch:
    unit = unit_rows(decoder)
    cosine = unit @ directions.T  # [d_sae, n_features]
    best_cosine, best = cosine.max(dim=1)
    first, second = torch.triu_indices(len(directions), len(directions), offset=1)
    sums = unit_rows(directions[first] + directions[second])
    pair_cosine, pair = (unit @ sums.T).max(dim=1)
    per_feature = cosine.max(dim=0).values
    return GroundTruthMatch(
        best=best.numpy(),
        cosine=best_cosine.numpy().astype(np.float64),
        pair=torch.stack([first[pair], second[pair]], dim=1).numpy(),
        pair_cosine=pair_cosine.numpy().astype(np.float64),
        mmcs=float(per_feature.mean()),
        recovered=float((per_feature > 0.9).float().mean()),
    )
