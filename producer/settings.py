"""One settings loader for every process: a dataclass's defaults, then TOKENRELAY_* variables, then CLI flags.

Everything comes from the dataclass's fields, so an option is declared once: its name gives the
variable (`kv_cache_dtype` -> `TOKENRELAY_KV_CACHE_DTYPE`) and the flag (`--kv-cache-dtype`), its
annotation the parser (int, float, str, bool, each optionally `| None`), its metadata (see `setting`)
the help text and whether it is a secret. Fields of other types are not read from anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

ENV_PREFIX = "TOKENRELAY_"
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_URL_PASSWORD = re.compile(r"//([^:@/]*):[^@/]*@")
_KINDS = (bool, int, float, str)

T = TypeVar("T")


class _ExplicitNone:
    def __repr__(self) -> str:
        return "EXPLICIT_NONE"


# An override of None means "not given"; this one means None itself (`--quantization none` over a variable).
EXPLICIT_NONE: Any = _ExplicitNone()


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    env: bool = True,
    flag: bool = True,
    secret: bool = False,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its help text; env=False / flag=False keep it out of TOKENRELAY_* / the CLI."""
    metadata = {"help": help, "env": env, "flag": flag, "secret": secret}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True, slots=True)
class Option:
    """One field as the loader sees it."""

    name: str
    kind: type  # bool, int, float or str
    optional: bool  # `X | None`: the word "none" reads as None
    default: Any  # dataclasses.MISSING when the field has a default_factory
    help: str
    env: bool
    flag: bool
    secret: bool

    @property
    def env_name(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag_name(self) -> str:
        return "--" + self.name.replace("_", "-")

    def convert(self, raw: str) -> Any:
        """The value of `raw` for this field; ValueError says what was expected."""
        text = raw.strip()
        if self.optional and text.lower() == "none":
            return None
        if self.kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError(f"expected true/false, 1/0 or yes/no, got {raw!r}")
        if self.kind is int:
            try:
                return int(text)
            except ValueError:
                raise ValueError(f"expected an integer, got {raw!r}") from None
        if self.kind is float:
            try:
                return float(text)
            except ValueError:
                raise ValueError(f"expected a number, got {raw!r}") from None
        return raw

    def parse(self, raw: str, source: str) -> Any:
        """`convert`, with errors naming where the text came from (a variable or a flag)."""
        try:
            return self.convert(raw)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None


def _kind(annotation: Any) -> tuple[type, bool] | None:
    """(bool|int|float|str, optional) for a supported annotation, else None."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            return None
        annotation, optional = args[0], True
    return (annotation, optional) if annotation in _KINDS else None


def options(cls: type) -> list[Option]:
    """The fields of dataclass `cls` that the loader can read, in declaration order."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        kind = _kind(hints[f.name])
        if kind is None:
            continue
        meta = f.metadata
        found.append(
            Option(
                f.name,
                kind[0],
                kind[1],
                f.default,
                meta.get("help", ""),
                meta.get("env", True),
                meta.get("flag", True),
                meta.get("secret", False),
            )
        )
    return found


def read(
    cls: type,
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    only: Collection[str] | None = None,
) -> dict[str, Any]:
    """The values given for `cls`'s fields: TOKENRELAY_<FIELD> variables, then `overrides` that are not None
    (EXPLICIT_NONE, which a flag given "none" parses to, sets None).

    Fields given neither way are left out, so the dataclass's defaults apply. An empty variable counts
    as unset (as `${VAR:-}` in a compose file leaves it); an override naming no field is a TypeError.
    """
    environ = os.environ if environ is None else environ
    known = {o.name: o for o in options(cls) if only is None or o.name in only}
    overrides = overrides or {}
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls) if only is None or f.name in only}
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown setting(s) {sorted(unknown)}")
    values: dict[str, Any] = {}
    for option in known.values():
        raw = environ.get(option.env_name) if option.env else None
        if raw is not None and raw.strip():
            values[option.name] = option.parse(raw, option.env_name)
    values.update({k: None if v is EXPLICIT_NONE else v for k, v in overrides.items() if v is not None})
    return values


def load(cls: type[T], overrides: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None) -> T:
    """`cls(**read(...))`: defaults, then the environment, then explicit overrides (None: not given)."""
    return cls(**read(cls, overrides, environ=environ))


def mask_url(url: str) -> str:
    """`redis://user:secret@host` -> `redis://user:***@host`: URLs in logs never carry a password."""
    return _URL_PASSWORD.sub(r"//\1:***@", url)


def describe(settings: Any) -> dict[str, Any]:
    """For the start-up log line: every field that is set, secrets masked and passwords cut out of URLs."""
    secret = {o.name for o in options(type(settings)) if o.secret}
    values = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value is None:
            continue
        if f.name in secret:
            value = "***"
        elif isinstance(value, str) and "://" in value:
            value = mask_url(value)
        values[f.name] = value
    return values


def _flag_type(option: Option) -> Any:
    def convert(raw: str) -> Any:
        try:
            value = option.convert(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return EXPLICIT_NONE if value is None else value

    convert.__name__ = option.kind.__name__
    return convert


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    flags: Mapping[str, str] | None = None,
    helps: Mapping[str, str] | None = None,
    only: Collection[str] | None = None,
    exclude: Collection[str] = (),
) -> None:
    """One flag per field of `cls` (`--field-name`, or the name `flags` gives), each defaulting to None
    (not given) so that the environment and the dataclass's default still apply beneath it.

    Booleans take a value (`--fused-layers false`); alone, a boolean flag means true.
    """
    flags, helps = flags or {}, helps or {}
    for option in options(cls):
        if not option.flag or option.name in exclude or (only is not None and option.name not in only):
            continue
        notes = []
        if option.default not in (dataclasses.MISSING, None, ""):
            notes.append(f"default {str(option.default).lower() if option.kind is bool else option.default}")
        if option.env:
            notes.append(f"env {option.env_name}")
        text = " ".join(filter(None, [helps.get(option.name) or option.help, f"({'; '.join(notes)})" if notes else ""]))
        kwargs: dict[str, Any] = {
            "dest": option.name,
            "type": _flag_type(option),
            "default": None,
            "help": text.replace("%", "%%"),
        }
        if option.kind is bool:
            kwargs.update(nargs="?", const=True, metavar="{true,false}")
        elif option.kind is int:
            kwargs["metavar"] = "N"
        elif option.kind is float:
            kwargs["metavar"] = "X"
        parser.add_argument(flags.get(option.name, option.flag_name), **kwargs)
