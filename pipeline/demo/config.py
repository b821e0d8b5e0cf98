"""Everything `saescope demo` and `saescope train-lm` take."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from saescope.pipeline.config import check_bounds, quiet_setting, seed_setting, setting
from saescope.pipeline.errors import InputError


@dataclass
class DemoConfig:
    """Everything `saescope demo` takes besides where to serve."""

    data: Path = setting(Path("data/demo"), "Directory for the demo database (and retrained SAEs).")
    serve: bool = setting(True, "Serve the dashboard once built.")
    retrain: bool = setting(
        False,
        "Train the demo SAEs again from their seeds into DATA/saes (about 32 minutes on 2 cores "
        "for the three) and build the database from them, instead of from the committed SAEs.",
        negatable=False,
    )
    quiet: bool = quiet_setting()


@dataclass
class LanguageModelConfig:
    """Shape and training schedule of the demo language model."""

    vocab_size: int = setting(4096, "BPE vocabulary size.", at_least=1)
    d_model: int = setting(128, "Residual stream width.", at_least=1)
    n_layers: int = setting(4, "Transformer blocks.", at_least=1)
    n_heads: int = setting(4, "Attention heads per block.", at_least=1)
    context_length: int = setting(128, "Tokens per training context.", at_least=1)
    batch_size: int = setting(32, "Contexts per step.", at_least=1)
    epochs: float = setting(6.0, "Passes over the training contexts.", greater_than=0)
    # Reached after 5% of the steps, then a cosine decay to 10% of it.
    learning_rate: float = setting(2e-3, "Peak AdamW learning rate.", greater_than=0)
    weight_decay: float = 0.05
    """AdamW weight decay"""
    seed: int = seed_setting()

    def validate(self) -> None:
        check_bounds(self)
        if self.d_model % self.n_heads:
            raise InputError("--d-model must be a multiple of --n-heads")


@dataclass
class TrainLanguageModelConfig:
    """Everything `saescope train-lm` takes."""

    out: Path = setting(Path("pipeline/demo/model"), "Directory for the model and tokenizer.")
    model: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    quiet: bool = quiet_setting()
