"""Everything `saescope build` takes: each setting declared once, with its default and help."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saescope.db.flags import HIGH_FREQUENCY
from saescope.db.models import TOKEN_LATENTS
from saescope.pipeline.checkpoints import FORMATS as CHECKPOINT_FORMATS
from saescope.pipeline.config import (
    PASS_CELLS,
    SourceConfig,
    as_options,
    check_bounds,
    from_options,
    quiet_setting,
    seed_setting,
    setting,
)
from saescope.pipeline.errors import InputError

# Model and SAE dtypes, by name (torch.float32, ...).
DTYPES = ("float32", "float16", "bfloat16")
# Where the pass's per-entry work runs.
SCANS = ("auto", "kernels", "torch")


@dataclass
class ExampleCounts:
    """How many examples of each kind to keep per feature, and how many positions to sample for
    all features together."""

    top: int = setting(20, "Top activating examples per feature.", flag="--k-top", at_least=1)
    bottom: int = setting(
        10, "Weakest positive examples per feature.", flag="--k-bottom", at_least=1
    )
    decoder_top: int = setting(
        20, "Decoder-direction top examples per feature.", flag="--k-decoder", at_least=1
    )
    sample_positions: int = setting(
        16_384, "Positions sampled uniformly for the absorption measure.", at_least=1
    )
    active_sample: int = 100
    """uniform sample of each feature's active positions, later split into quantile bands"""


@dataclass
class AnalysisSettings:
    """Sizes and thresholds of the derived per-feature tables."""

    high_frequency_threshold: float = setting(
        HIGH_FREQUENCY.default_threshold,
        "Flag features firing on more than this share of tokens.",
        greater_than=0,
        at_most=1,
    )
    quantile_bands: int = setting(
        10, "Bands cut at equally spaced quantiles of the active values.", at_least=1
    )
    examples_per_band: int = setting(4, "Random examples per band.", at_least=1)
    n_logits: int = 10
    """top and bottom tokens of W_dec·W_U"""
    n_neighbours: int = 10
    """nearest latents by decoder cosine"""
    n_top_tokens: int = 10
    """tokens a feature fires on most, and tokens it is most specific to"""
    n_token_latents: int = TOKEN_LATENTS
    """latents kept per token id for token search: the most specific to it"""
    min_token_firings: int = 3
    """firings on a token before a latent's specificity to it counts: one-off tokens never lead"""
    n_absorbers: int = 5
    """absorbing latents kept per feature"""


@dataclass
class BuildConfig:
    """Everything `saescope build` takes."""

    out: Path = setting(help="Database file to create, or to add this SAE to.")
    source: SourceConfig = field(default_factory=SourceConfig)
    sae: Path | None = setting(
        None,
        "SAE directory: SAELens's format (cfg.json + sae_weights.safetensors), a sparsify "
        "checkpoint folder (cfg.json + sae.safetensors) or a dictionary_learning one (ae.pt + "
        "config.json).",
    )
    sae_format: str = setting(
        "auto",
        "Format of the --sae directory: auto (told by its files), saelens, sparsify or "
        "dictionary-learning.",
        choices=CHECKPOINT_FORMATS,
    )
    sae_release: str | None = setting(None, "SAELens release to load the SAE from (needs network).")
    sae_id: str | None = setting(None, "SAE id within --sae-release.")
    name: str | None = setting(
        None, "Name of the SAE in the database. Default: the SAE directory or id."
    )
    batch_size: int = setting(32, "Contexts per forward pass.", at_least=1)
    latent_chunk: int | None = setting(
        None,
        "Latents encoded and accumulated at a time. Default: as many as keep a batch's "
        f"activations within 2**{PASS_CELLS.bit_length() - 1} values ({PASS_CELLS * 4 >> 20} MB).",
        at_least=1,
    )
    dtype: str = setting(
        "float32", "Model and SAE dtype: float32, float16 or bfloat16.", choices=DTYPES
    )
    scan: str = setting(
        "auto",
        "Where the pass's per-latent work runs: kernels (compiled, on the CPU) or torch (on "
        "--device; only what is kept crosses to the host). auto: kernels on the CPU, torch "
        "elsewhere. Both give the same database.",
        choices=SCANS,
    )
    examples: ExampleCounts = field(default_factory=ExampleCounts)
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    eval_sequences: int = setting(
        64,
        "Contexts (the first of the corpus) for MSE, explained variance, cross-entropy, "
        "threshold ablation and the precision of the description length.",
        at_least=1,
    )
    compare: bool = setting(
        True,
        "Match the SAE's latents by decoder cosine with every SAE of the file of the same input "
        "width, each way (`saescope compare` does it later for two).",
    )
    seed: int = seed_setting()
    replace: bool = setting(False, "Replace an SAE of the same name already in the database.")
    quiet: bool = quiet_setting()

    def __post_init__(self) -> None:
        # Enough active positions that every band can show its examples.
        bands = self.analysis.quantile_bands * self.analysis.examples_per_band
        self.examples.active_sample = max(100, 3 * bands)

    def validate(self) -> None:
        check_bounds(self)
        if self.sae is not None and self.sae_release is not None:
            raise InputError("give either --sae or --sae-release/--sae-id, not both")

    def record(self) -> dict[str, Any]:
        """The options as the database stores them beside the SAE: every field, groups
        flattened (`from_record` reads them back), with the local paths absolute and the scan
        resolved; not the output file, which is where the record lives."""
        record = as_options(self)
        del record["out"]
        sae = self.sae.resolve() if self.sae is not None else None
        record |= {
            "model": _local_or_name(self.source.model),
            "sae": _text(sae),
            "scan": self.resolved_scan(),
        }
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any], out: Path) -> BuildConfig:
        """The config a stored record was made from, the database `out` holding it (settings it
        lacks at their defaults)."""
        return from_options(cls, {**record, "out": out})

    def resolved_scan(self) -> str:
        if self.scan != "auto":
            return self.scan
        return "kernels" if self.source.device.split(":")[0] == "cpu" else "torch"

    def sae_name(self) -> str:
        """The name given, else one made from the SAE directory or id."""
        if self.name:
            return self.name
        raw = self.sae.resolve().name if self.sae is not None else str(self.sae_id)
        cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in raw).strip("-.")
        return cleaned or "sae"


def _local_or_name(model: str | None) -> str | None:
    """A local model directory as an absolute path (the inference process may run elsewhere); a
    hub name as it is."""
    if model is not None and Path(model).exists():
        return str(Path(model).resolve())
    return model


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)
