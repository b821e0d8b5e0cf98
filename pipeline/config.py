"""Settings of the pipeline's commands, declared once.

Each setting is a dataclass field made by `setting`: its default, its help, its bounds and its
command-line flag live together, and the command line (`saescope.cli`) builds its options from
them. A dataclass field whose type is another dataclass is a group whose settings appear as
options of their own.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saescope.pipeline.errors import InputError

# Where a setting's declaration lives in its field's metadata.
SETTING = "saescope.setting"
# Dense activations are made this many (token, latent) cells at a time (256 MB in float32): a
# wide SAE is encoded a chunk of latents at a time, or a chunk of tokens at a time.
ACTIVATION_CELLS = 1 << 26
# The build's pass holds about three dense arrays a cell (the activations, their host copy and
# the decoder projections: 12 bytes) and keeps freed blocks for reuse, where blocks this large
# fragment its heap: its chunks are a quarter of that.
PASS_CELLS = ACTIVATION_CELLS // 4


@dataclass(frozen=True)
class Setting:
    help: str
    flag: str | None = None
    """the option's name (default: from the field's name, `--k-top` for `k_top`)"""
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    at_least: float | None = None
    greater_than: float | None = None
    at_most: float | None = None
    negatable: bool = True
    """a boolean with `--no-` form; otherwise a flag that turns it on"""


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    **declaration: Any,
) -> Any:
    """A dataclass field that is also a command-line option."""
    return field(
        default=default,
        default_factory=default_factory,
        metadata={SETTING: Setting(help=help, **declaration)},
    )


def quiet_setting() -> Any:
    return setting(False, "No progress bars or log lines.", negatable=False)


def seed_setting() -> Any:
    return setting(0, "Seed of every random choice: initialisation, shuffling, samples.")


def declaration(dataclass_field: dataclasses.Field) -> Setting | None:
    return dataclass_field.metadata.get(SETTING)


def flag_of(dataclass_field: dataclasses.Field) -> str:
    declared = declaration(dataclass_field)
    if declared is not None and declared.flag:
        return declared.flag
    return "--" + dataclass_field.name.replace("_", "-")


def settings_of(cls: type) -> Iterator[tuple[dataclasses.Field, Any, Setting]]:
    """Each setting of a config class, groups flattened: (field, its resolved type, declaration)."""
    hints = typing.get_type_hints(cls)
    for dataclass_field in dataclasses.fields(cls):
        kind = hints[dataclass_field.name]
        if dataclasses.is_dataclass(kind):
            yield from settings_of(kind)
        elif (declared := declaration(dataclass_field)) is not None:
            yield dataclass_field, kind, declared


def from_options(cls: type, options: dict[str, Any]) -> Any:
    """An instance of a config class from option values by field name, groups nested."""
    hints = typing.get_type_hints(cls)
    values = {}
    for dataclass_field in dataclasses.fields(cls):
        kind = hints[dataclass_field.name]
        if dataclasses.is_dataclass(kind):
            values[dataclass_field.name] = from_options(kind, options)
        elif dataclass_field.name in options and declaration(dataclass_field) is not None:
            values[dataclass_field.name] = options[dataclass_field.name]
    return cls(**values)


def as_options(config: Any) -> dict[str, Any]:
    """Every field of a config by name, groups flattened, paths as text: what `from_options`
    reads back (as JSON, too)."""
    values: dict[str, Any] = {}
    for dataclass_field in dataclasses.fields(config):
        value = getattr(config, dataclass_field.name)
        if dataclasses.is_dataclass(value):
            values |= as_options(value)
        else:
            values[dataclass_field.name] = str(value) if isinstance(value, Path) else value
    return values


def check_bounds(config: Any) -> None:
    """Raises InputError for the first setting outside its declared bounds or choices."""
    for dataclass_field in dataclasses.fields(config):
        value = getattr(config, dataclass_field.name)
        if dataclasses.is_dataclass(value):
            check_bounds(value)
            continue
        declared = declaration(dataclass_field)
        if declared is None or value is None:
            continue
        flag = flag_of(dataclass_field)
        if declared.choices is not None and value not in declared.choices:
            raise InputError(f"{flag} must be one of {', '.join(declared.choices)}")
        if declared.at_least is not None and value < declared.at_least:
            raise InputError(f"{flag} must be at least {declared.at_least:g}")
        if declared.greater_than is not None and value <= declared.greater_than:
            raise InputError(f"{flag} must be greater than {declared.greater_than:g}")
        if declared.at_most is not None and value > declared.at_most:
            raise InputError(f"{flag} must be at most {declared.at_most:g}")


@dataclass
class SourceConfig:
    """Where the activations come from, and where the model runs: shared by build and train."""

    model: str | None = setting(
        None, "HuggingFace model name, or a local HuggingFace model directory."
    )
    hook: str | None = setting(
        None,
        "Hook name whose activations the SAE reads. Default: the hook the SAE names, where it "
        "names one.",
    )
    corpus: str | None = setting(
        None,
        "Token ids [n_sequences, context] as .npy/.pt/.safetensors; or .txt/.jsonl files "
        "(a directory of them) to tokenize; or a HuggingFace dataset name.",
    )
    synthetic: Path | None = setting(
        None, "Synthetic dataset from `saescope synth`, instead of model and corpus."
    )
    n_tokens: int = setting(
        262_144, "Corpus tokens to read, rounded up to whole contexts.", at_least=1
    )
    context_length: int | None = setting(
        None,
        "Tokens per context. Default: the SAE's context_size, else the token array's width, "
        "else 128.",
        at_least=1,
    )
    device: str = setting("cpu", "torch device of the model and the SAE: cpu, cuda, cuda:1, mps.")
    weight_processing: bool | None = setting(
        None,
        "Fold LayerNorm and centre writing weights (HookedTransformer numerics). Default: on, "
        "following the SAE's model_from_pretrained_kwargs where it states them.",
    )
