"""Everything `saescope synth` takes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saescope.pipeline.config import check_bounds, setting
from saescope.pipeline.errors import InputError

GENERATORS = ("sparse", "toy", "composed", "hierarchical")


@dataclass
class SyntheticConfig:
    """Everything `saescope synth` takes."""

    generator: str = setting(
        help="sparse (independent directions), toy (toy model of superposition), composed "
        "(feature sets), hierarchical (parents and children: absorption).",
        choices=GENERATORS,
    )
    out: Path = setting(help="File to write (.safetensors).")
    n_samples: int = setting(262_144, "Samples (tokens) to generate.", at_least=1)
    d: int = setting(64, "Activation width (toy: hidden width m).", at_least=1)
    context_length: int = setting(16, "Samples per synthetic sequence.", at_least=1)
    n_features: int = setting(128, "sparse, toy: number of true features.", at_least=1)
    p_active: float = setting(0.02, "sparse: probability a feature is on.", at_least=0, at_most=1)
    sparsity: float = setting(
        0.9, "toy: S, the probability a feature is off.", at_least=0, at_most=1
    )
    importance_decay: float = setting(0.9, "toy: importance of feature i is decay**i.")
    n_sets: int = setting(2, "composed: number of feature sets.", at_least=1)
    set_size: int = setting(2, "composed: features per set.", at_least=1)
    p_none: float = setting(
        0.0, "composed: probability a set has no active feature.", at_least=0, at_most=1
    )
    correlation: float = setting(
        0.0, "composed: probability a set copies the first set's choice.", at_least=0, at_most=1
    )
    correlated_amplitudes: bool = setting(
        False, "composed: one amplitude shared by a sample's sets."
    )
    n_parents: int = setting(8, "hierarchical: parent features.", at_least=1)
    children_per_parent: int = setting(3, "hierarchical: children of each parent.", at_least=1)
    p_parent: float = setting(
        0.1, "hierarchical: probability a parent is on.", at_least=0, at_most=1
    )
    p_child: float = setting(
        0.7, "hierarchical: probability an active parent has a child on.", at_least=0, at_most=1
    )
    seed: int = setting(0, "Seed of the generator.")

    def validate(self) -> None:
        check_bounds(self)
        if self.n_samples < self.context_length:
            raise InputError("--n-samples must cover one sequence (--context-length)")
