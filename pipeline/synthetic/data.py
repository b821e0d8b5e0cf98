"""Synthetic activations with known ground-truth features.

Each generator returns activations together with the true feature directions, so one can check
whether an SAE recovered them and whether the dashboard's absorption view catches planted
absorption. Samples are grouped into short "sequences" whose token strings name the active
ground-truth features (`x2+y1`, `p0+p0.c1`, `∅` for none), so examples read naturally and token
search finds features by name. Every generator is seeded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from saescope.pipeline.build.accumulators import unit_rows

GENERATORS = ("sparse", "toy", "composed", "hierarchical")
SET_NAMES = "xyzwvuts"


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


# ---------------------------------------------------------------------------------------------
# The synthetic source file read by `saescope train --synthetic` and `saescope build --synthetic`


@dataclass
class SyntheticSource:
    activations: Float[Tensor, "seq ctx d"]
    token_ids: np.ndarray  # [seq, ctx] into vocab
    vocab: list[str]
    directions: Float[Tensor, "n_features d"]
    names: list[str]
    parents: dict[int, int]
    description: dict


def save_source(data: SyntheticData, path: Path, context_length: int, description: dict) -> None:
    from safetensors.torch import save_file

    n_sequences = len(data.activations) // context_length
    if n_sequences == 0:
        raise ValueError(f"fewer samples than one sequence of {context_length}")
    used = n_sequences * context_length
    strings = token_strings(data)[:used]
    vocab = sorted(set(strings))
    index = {token: i for i, token in enumerate(vocab)}
    token_ids = torch.tensor([index[s] for s in strings]).view(n_sequences, context_length)
    metadata = {
        "names": json.dumps(data.names),
        "vocab": json.dumps(vocab),
        "parents": json.dumps({str(k): v for k, v in data.parents.items()}),
        "description": json.dumps(description),
    }
    tensors = {
        "activations": data.activations[:used]
        .reshape(n_sequences, context_length, -1)
        .contiguous(),
        "directions": data.directions.contiguous(),
        "token_ids": token_ids,
    }
    save_file(tensors, str(path), metadata=metadata)


def load_source(path: Path) -> SyntheticSource:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if "names" not in metadata:
            raise ValueError(f"{path} is not a synthetic source written by `saescope synth`")
        return SyntheticSource(
            activations=handle.get_tensor("activations").float(),
            token_ids=handle.get_tensor("token_ids").numpy().astype(np.int64),
            vocab=json.loads(metadata["vocab"]),
            directions=handle.get_tensor("directions").float(),
            names=json.loads(metadata["names"]),
            parents={int(k): v for k, v in json.loads(metadata["parents"]).items()},
            description=json.loads(metadata["description"]),
        )


def chunked(activations: Tensor, chunk: int = 4096) -> Callable[[], Iterator[Tensor]]:
    """An activation source (see `train_sae`) over a fixed tensor."""

    def sample_activations() -> Iterator[Tensor]:
        yield from activations.split(chunk)

    return sample_activations


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
