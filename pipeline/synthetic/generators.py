"""Generators of synthetic activations with known ground-truth features.

Each generator returns activations together with the true feature directions, so one can check
whether an SAE recovered them and whether the dashboard's absorption view catches planted
absorption. Samples are grouped into short "sequences" whose token strings name the active
ground-truth features (`x2+y1`, `p0+p0.c1`, `∅` for none), so examples read naturally and token
search finds features by name. Every generator is seeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from saescope.pipeline.synthetic.config import SyntheticConfig

SET_NAMES = "xyzwvuts"


def generate(config: SyntheticConfig) -> SyntheticData:
    """The data the configured generator draws."""
    c = config
    if c.generator == "sparse":
        return sparse_linear_combinations(c.n_features, c.d, c.n_samples, c.p_active, c.seed)
    if c.generator == "toy":
        return toy_model(c.n_features, c.d, c.n_samples, c.sparsity, c.importance_decay, c.seed)
    if c.generator == "composed":
        return composed(
            c.n_sets, c.set_size, c.d, c.n_samples, c.p_none, c.correlation,
            c.correlated_amplitudes, c.seed,
        )  # fmt: skip
    return hierarchical(
        c.n_parents, c.children_per_parent, c.d, c.n_samples, c.p_parent, c.p_child, c.seed
    )


@dataclass
class SyntheticData:
    activations: Float[Tensor, "n d"]
    directions: Float[Tensor, "n_features d"]
    """unit-norm ground-truth feature directions"""
    amplitudes: Float[Tensor, "n n_features"]
    """each sample's ground-truth feature activations"""
    names: list[str]
    parents: dict[int, int] = field(default_factory=dict)
    """child feature → its parent feature (hierarchical data)"""


def _unit_directions(n_features: int, d: int, generator: torch.Generator) -> Tensor:
    """Orthonormal directions when they fit in d dimensions, random unit vectors otherwise."""
    if n_features <= d:
        q, _ = torch.linalg.qr(torch.randn(d, n_features, generator=generator))
        return q.T.contiguous()
    directions = torch.randn(n_features, d, generator=generator)
    return directions / directions.norm(dim=1, keepdim=True)


def _magnitudes(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return 0.5 + torch.rand(shape, generator=generator)


def sparse_linear_combinations(
    n_features: int, d: int, n_samples: int, p_active: float, seed: int
) -> SyntheticData:
    """Random unit directions; each feature independently active with probability `p_active`,
    with an amplitude uniform in [0.5, 1.5]."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d, generator=generator)
    directions /= directions.norm(dim=1, keepdim=True)
    active = torch.rand(n_samples, n_features, generator=generator) < p_active
    amplitudes = active * _magnitudes((n_samples, n_features), generator)
    names = [f"f{i}" for i in range(n_features)]
    return SyntheticData(amplitudes @ directions, directions, amplitudes, names)


def toy_model(
    n_features: int,
    d: int,
    n_samples: int,
    sparsity: float,
    importance_decay: float,
    seed: int,
    train_steps: int = 4000,
) -> SyntheticData:
    """Toy model of superposition (Elhage et al., 2022): x_i is active with probability
    1 − sparsity, uniform in [0, 1]; a ReLU-output model x' = ReLU(WᵀW x + b), W of shape [d, n],
    is trained to minimise Σ_i I_i (x_i − x'_i)² with importances I_i = decay^i. The activations
    are its hidden layer h = W x, and the true directions the columns of W."""
    generator = torch.Generator().manual_seed(seed)

    def sample(n: int) -> Tensor:
        active = torch.rand(n, n_features, generator=generator) >= sparsity
        return active * torch.rand(n, n_features, generator=generator)

    importance = importance_decay ** torch.arange(n_features, dtype=torch.float32)
    weights = (torch.randn(d, n_features, generator=generator) * 0.1).requires_grad_()
    bias = torch.zeros(n_features, requires_grad=True)
    optimizer = torch.optim.Adam([weights, bias], lr=1e-2)
    for _ in range(train_steps):
        x = sample(1024)
        reconstruction = torch.relu(x @ weights.T @ weights + bias)
        loss = (importance * (x - reconstruction) ** 2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weights = weights.detach()
    amplitudes = sample(n_samples)
    norms = weights.norm(dim=0).clamp_min(1e-8)
    return SyntheticData(
        amplitudes @ weights.T,
        (weights / norms).T.contiguous(),
        amplitudes * norms,
        [f"f{i}" for i in range(n_features)],
    )


def composed(
    n_sets: int,
    set_size: int,
    d: int,
    n_samples: int,
    p_none: float,
    correlation: float,
    correlated_amplitudes: bool,
    seed: int,
) -> SyntheticData:
    """Composed feature sets (Anders et al., 2024): in each set exactly one feature is active,
    or none with probability `p_none`. The first set's feature is uniform; every other set takes
    the same index as the first with probability `correlation`, else a uniform one. Amplitudes
    are uniform in [0.5, 1.5], shared by the sets of a sample if `correlated_amplitudes`."""
    generator = torch.Generator().manual_seed(seed)
    n_features = n_sets * set_size
    directions = _unit_directions(n_features, d, generator)
    first = torch.randint(set_size, (n_samples,), generator=generator)
    amplitudes = torch.zeros(n_samples, n_features)
    shared = _magnitudes((n_samples,), generator)
    rows = torch.arange(n_samples)
    for s in range(n_sets):
        choice = first
        if s > 0:
            copy = torch.rand(n_samples, generator=generator) < correlation
            choice = torch.where(
                copy, first, torch.randint(set_size, (n_samples,), generator=generator)
            )
        present = torch.rand(n_samples, generator=generator) >= p_none
        magnitude = shared if correlated_amplitudes else _magnitudes((n_samples,), generator)
        amplitudes[rows, s * set_size + choice] = present * magnitude
    names = [f"{SET_NAMES[s]}{i}" for s in range(n_sets) for i in range(set_size)]
    return SyntheticData(amplitudes @ directions, directions, amplitudes, names)


def hierarchical(
    n_parents: int,
    children_per_parent: int,
    d: int,
    n_samples: int,
    p_parent: float,
    p_child: float,
    seed: int,
) -> SyntheticData:
    """Hierarchical features that induce absorption (Chanin et al., 2024): each parent is active
    with probability `p_parent`; an active parent has one of its children active with
    probability `p_child`, so a parent is always active when any of its children is. An active
    child shares its parent's amplitude, uniform on [0.5, 1.5]: a latent for parent + child then
    reconstructs the pair exactly, and the parent's own latent can stay off, i.e. be absorbed."""
    generator = torch.Generator().manual_seed(seed)
    n_features = n_parents * (1 + children_per_parent)
    directions = _unit_directions(n_features, d, generator)
    amplitudes = torch.zeros(n_samples, n_features)
    names, parents = [], {}
    rows = torch.arange(n_samples)
    for parent in range(n_parents):
        index = parent * (1 + children_per_parent)
        names += [f"p{parent}"] + [f"p{parent}.c{c}" for c in range(children_per_parent)]
        active = torch.rand(n_samples, generator=generator) < p_parent
        magnitude = 0.5 + torch.rand(n_samples, generator=generator)
        amplitudes[:, index] = active * magnitude
        with_child = active & (torch.rand(n_samples, generator=generator) < p_child)
        child = index + 1 + torch.randint(children_per_parent, (n_samples,), generator=generator)
        amplitudes[rows, child] = with_child * magnitude
        for c in range(children_per_parent):
            parents[index + 1 + c] = index
    return SyntheticData(amplitudes @ directions, directions, amplitudes, names, parents)


def token_strings(data: SyntheticData) -> list[str]:
    """Each sample's token: the names of its active features joined by '+', or '∅', after a space
    like a word token's, so that a context reads as separate samples (token search ignores it)."""
    active = (data.amplitudes > 0).numpy()
    names = np.array(data.names)
    return [" " + ("+".join(names[row]) or "∅") for row in active]
