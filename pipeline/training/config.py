"""Everything `saescope train` takes: each setting declared once, with its default and help."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saescope.pipeline.config import (
    SourceConfig,
    check_bounds,
    quiet_setting,
    seed_setting,
    setting,
)
from saescope.pipeline.errors import InputError

OBJECTIVES = ("l1", "sqrt", "l0", "topk")
# The settings each objective reads beyond those all share: its hyperparameters.
OBJECTIVE_SETTINGS = {
    "l1": ("sparsity_coefficient",),
    "sqrt": ("sparsity_coefficient",),
    "l0": ("sparsity_coefficient", "l0_sharpness", "frequency_target", "frequency_coefficient"),
    "topk": ("k", "aux_coefficient"),
}
# Shared settings that tell SAEs apart as much as the objective's own.
SHARED_HYPERPARAMETERS = ("d_sae", "training_tokens", "learning_rate")


@dataclass
class TrainingSettings:
    """The objective and the optimisation: everything `train_sae` takes besides activations."""

    objective: str = setting(
        "topk", "l1, sqrt, l0 (tanh L0 + frequency penalty) or topk (+AuxK).", choices=OBJECTIVES
    )
    d_sae: int = setting(2048, "Dictionary size.", at_least=1)
    sparsity_coefficient: float = setting(
        1.0, "λ of l1, sqrt and l0.", aliases=("--lambda",), at_least=0
    )
    k: int = setting(32, "Active latents per token (topk).", at_least=1)
    l0_sharpness: float = 4.0
    """c in tanh(c·f·‖W_dec‖) of the l0 objective"""
    frequency_target: float = setting(
        0.05, "l0: firing frequency above which the penalty starts.", at_least=0, at_most=1
    )
    frequency_coefficient: float = setting(
        10.0, "l0: weight μ of the frequency penalty.", at_least=0
    )
    aux_coefficient: float = setting(
        1.0,
        "topk: weight α of the AuxK loss (the dead latents' reconstruction of the error).",
        at_least=0,
    )
    dead_after: int = setting(
        200_000, "Tokens without firing after which a latent is dead.", at_least=1
    )
    training_tokens: int = setting(2_000_000, "Training tokens.", at_least=1)
    batch_size: int = setting(4096, "Tokens per optimiser step.", at_least=1)
    learning_rate: float = setting(1e-3, "Peak Adam learning rate.", greater_than=0)
    warmup_fraction: float = setting(0.0, "Share of steps warming up.", at_least=0, at_most=1)
    decay_fraction: float = setting(
        0.0, "Share of steps, at the end, decaying to zero.", at_least=0, at_most=1
    )
    unit_decoder: bool = setting(
        True,
        "Decode with unit-norm rows: a row's norm is a free scale on its latent, folded out when "
        "saved (SAELens's rescale_acts_by_decoder_norm).",
    )
    decoder_init_norm: float | None = setting(
        None,
        "Initial norm of decoder rows and encoder columns. Default: 0.1, and 1 for sqrt.",
        greater_than=0,
    )
    max_grad_norm: float = 1.0
    """the gradient is clipped to this norm before each step (as SAELens's trainer)"""
    init_b_dec_median: bool = setting(
        True, "Initialise b_dec to the geometric median of activations."
    )
    init_decoder_from_data: bool = setting(
        False, "Initialise decoder rows from sampled activations."
    )
    resample_every: int = setting(0, "Steps between dead-latent resampling; 0 never.", at_least=0)
    log_every: int = setting(20, "Steps between training-log rows.", at_least=1)
    seed: int = seed_setting()

    def initial_norm(self) -> float:
        """Rows start small, so that Adam's steps turn them (Conerly et al., 2024); but the
        gradient of √f grows without bound as f → 0, and would switch off sqrt's latents
        before they learn."""
        if self.decoder_init_norm is not None:
            return self.decoder_init_norm
        return 1.0 if self.objective == "sqrt" else 0.1

    def hyperparameters(self) -> dict[str, Any]:
        """The settings that tell this training apart: the objective's own, then the shared
        ones that matter most."""
        names = OBJECTIVE_SETTINGS[self.objective] + SHARED_HYPERPARAMETERS
        return {name: getattr(self, name) for name in names}

    def validate(self) -> None:
        check_bounds(self)
        if self.objective == "topk" and self.k > self.d_sae:
            raise InputError(f"--k must be between 1 and --d-sae ({self.d_sae})")
        if self.training_tokens < self.batch_size:
            raise InputError(
                f"--training-tokens ({self.training_tokens}) must cover at least one batch "
                f"({self.batch_size})"
            )


@dataclass
class TrainConfig:
    """Everything `saescope train` takes."""

    out: Path = setting(help="Directory to save the SAE in (SAELens format).")
    source: SourceConfig = field(default_factory=SourceConfig)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    quiet: bool = quiet_setting()
