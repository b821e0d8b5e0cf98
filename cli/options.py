"""Command-line options made from the pipeline's config dataclasses: a setting's default, help,
flag and bounds are declared once, on its field (`saescope.pipeline.config.setting`)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from saescope.pipeline.config import flag_of, settings_of

CLICK_TYPES: dict[type, Any] = {
    int: int,
    float: float,
    str: str,
    Path: click.Path(path_type=Path),
}


def _base_type(kind: Any) -> type:
    """`X` of `X | None`."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        (base,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        return base
    return kind


def options_of(config_class: type) -> list[click.Option]:
    """One option per setting of `config_class`, groups flattened, in field order."""
    options = []
    for field, kind, declared in settings_of(config_class):
        flag = flag_of(field)
        base = _base_type(kind)
        required = (
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        )
        default = None if required else field.default
        if base is bool:
            names = [f"{flag}/--no-{flag[2:]}" if declared.negatable else flag, *declared.aliases]
            option = click.Option(
                [*names, field.name],
                is_flag=True,
                default=default,
                help=declared.help,
                show_default=default is not None,
            )
        else:
            option = click.Option(
                [flag, *declared.aliases, field.name],
                type=CLICK_TYPES[base],
                default=default,
                required=required,
                help=declared.help,
                show_default=default is not None,
            )
        options.append(option)
    names = [option.name for option in options]
    duplicates = {name for name in names if names.count(name) > 1}
    if duplicates:
        raise TypeError(f"{config_class.__name__} declares {sorted(duplicates)} more than once")
    return options


def with_options(config_class: type) -> Callable[[Callable], Callable]:
    """Decorator: the command takes `config_class`'s settings as options (after its own)."""

    def decorate(command: Callable) -> Callable:
        command.__click_params__ = [
            *getattr(command, "__click_params__", []),
            *reversed(options_of(config_class)),
        ]
        return command

    return decorate
