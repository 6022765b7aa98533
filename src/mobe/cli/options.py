"""Command-line options generated from the config dataclasses (as transformers' `HfArgumentParser` does).

Each field of `MobeConfig`, `QuantizeConfig` or `DistillConfig` becomes one option: `--kebab-name` (or the field's
`metadata["flag"]`, plus `metadata["aliases"]`), its type from the annotation, its default from the dataclass and
its help, choices and metavar from the metadata, so that names, defaults and help live in config.py alone. A prefix
(`--distill-`, `--quantize-`) puts one config's options on a command that already has options of the same name.
Imports no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any


def int_list(text: str) -> tuple[int, ...]:
    """'1,3-5' -> (1, 3, 4, 5)."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)


def str_list(text: str) -> tuple[str, ...]:
    """'gate,up' -> ('gate', 'up'), empty parts dropped."""
    return tuple(part for part in text.split(",") if part)


def _selected(cls: type, only: Collection[str] | None, exclude: Collection[str]) -> list[dataclasses.Field]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(only or ()) | set(exclude)
    if unknown - names:
        raise ValueError(f"{cls.__name__} has no field {sorted(unknown - names)}")
    return [f for f in dataclasses.fields(cls) if (only is None or f.name in only) and f.name not in exclude]


def _kind(annotation: Any) -> tuple[Callable[[str], Any] | None, str]:
    """(argparse type, help suffix) of a field's annotation; `X | None` is X."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in args if a is not type(None)]
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        if args[0] is int:
            return int_list, " (comma-separated; ranges as 3-5)"
        return str_list, " (comma-separated)"
    if annotation is bool:
        return None, ""  # a --name / --no-name pair
    if annotation in (int, float, str):
        return annotation, ""
    raise TypeError(f"no command-line type for {annotation!r}")


def dest(field: dataclasses.Field, prefix: str = "") -> str:
    return prefix.replace("-", "_") + field.name


def add_config_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    prefix: str = "",
    only: Collection[str] | None = None,
    exclude: Collection[str] = (),
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """An option for each field of the dataclass `cls` (those in `only`, but those in `exclude`).

    `prefix` goes before every option name and its destination (`--distill-lr` into `args.distill_lr`; aliases are
    dropped); `overrides` maps a field name to add_argument keywords that replace the generated ones.
    """
    hints = typing.get_type_hints(cls)
    for field in _selected(cls, only, exclude):
        meta = field.metadata
        kind, suffix = _kind(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if isinstance(default, tuple):  # shown and parsed as typed: "gate,up,down"
            default = ",".join(map(str, default))
        flag = meta.get("flag", "--" + field.name.replace("_", "-"))
        names = ["--" + prefix + flag.removeprefix("--"), *(() if prefix else meta.get("aliases", ()))]
        kwargs: dict[str, Any] = {
            "dest": dest(field, prefix),
            "default": default,
            "help": (meta.get("help", "") + suffix).replace("%", "%%"),
        }
        if kind is None:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
        for key in ("choices", "metavar"):
            if key in meta:
                kwargs[key] = meta[key]
        kwargs.update((overrides or {}).get(field.name, {}))
        parser.add_argument(*names, **kwargs)


def config_from_args(
    cls: type,
    args: argparse.Namespace,
    *,
    prefix: str = "",
    only: Collection[str] | None = None,
    exclude: Collection[str] = (),
    **values: Any,
) -> Any:
    """`cls` from the options `add_config_options` added (same prefix and selection), plus `values`."""
    given = {field.name: getattr(args, dest(field, prefix)) for field in _selected(cls, only, exclude)}
    return cls(**given, **values)
