"""Synthetic activations with known ground-truth features, for checking that SAEs recover them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor


@dataclass
class SyntheticData:
    activations: Float[Tensor, "n d"]
    directions: Float[Tensor, "n_features d"]
    """unit-norm ground-truth feature directions"""
    amplitudes: Float[Tensor, "n n_features"]
    """each sample's ground-truth feature activations"""


def sparse_linear_combinations(
    n_features: int, d: int, n_samples: int, p_active: float, seed: int
) -> SyntheticData:
    """Random unit directions; each feature independently active with probability `p_active`,
    with an amplitude uniform in [0.5, 1.5]."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d, generator=generator)
    directions /= directions.norm(dim=1, keepdim=True)
    active = torch.rand(n_samples, n_features, generator=generator) < p_active
    magnitude = 0.5 + torch.rand(n_samples, n_features, generator=generator)
    amplitudes = active * magnitude
    return SyntheticData(amplitudes @ directions, directions, amplitudes)


def chunked(activations: Tensor, chunk: int = 4096) -> Callable[[], Iterator[Tensor]]:
    """An activation source (see `train_sae`) over a fixed tensor."""

    def sample_activations() -> Iterator[Tensor]:
        yield from activations.split(chunk)

    return sample_activations


def mean_max_cosine(directions: Tensor, decoder: Tensor) -> float:
    """MMCS: mean over ground-truth directions of the best decoder cosine (Sharkey et al., 2022)."""
    unit = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((directions @ unit.T).max(dim=1).values.mean())
