"""Command lines from dataclasses: the one builder behind ``train.py``, ``evaluate.py`` and the bench
scripts.

Every field of a configuration dataclass becomes a ``--flag`` of the same name:

* its **help line** is the first sentence of the docstring written under the field (the full text
  stays in the source and the README), followed by the default and, for a ``Literal``, the choices;
* its **type** comes from the annotation: ``bool`` (``on``/``off``, ``true``/``false``, ``1``/``0``),
  ``int``, ``float``, ``str``, ``X | None`` (the flag takes an ``X``), ``Literal[...]`` (one of the
  choices, listed in the help; the dataclass checks them itself with :func:`check_choices`, so a
  value from a flag, a config file or code gets the same one-line error);
* ``field(metadata={"group": ...})`` puts it into an argparse group, so ``--help`` reads one group
  at a time.

Flags that are not given keep the dataclass default (or a config file's value, see
:func:`parse_config`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import json
import textwrap
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from rdcore import ConfigError

T = TypeVar("T")

BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
              "0": False, "false": False, "no": False, "off": False}


def option(default: Any, group: str, *, resumable: bool = False, **extra: Any) -> Any:
    """A dataclass field with its command-line ``group`` and whether it may change when a run is
    resumed (``resumable``); ``extra`` goes into the field's metadata too."""
    return dataclasses.field(default=default,
                             metadata={"group": group, "resumable": resumable, **extra})


def parse_bool(text: str) -> bool:
    """``on``/``off`` (and true/false, yes/no, 1/0, any case) as a bool."""
    if isinstance(text, bool):
        return text
    value = BOOL_WORDS.get(str(text).lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return value


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of the dataclass ``cls`` (and its bases), one line
    of whitespace-normalised text per field."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for node, nxt in itertools.pairwise(body):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def first_sentence(text: str) -> str:
    """The text up to the end of its first sentence ("." followed by a space), for a help line."""
    for i in range(len(text) - 1):
        if text[i] == "." and text[i + 1] == " " and not text[max(0, i - 2):i + 1].endswith(
                ("e.g.", "i.e.", "vs.")):
            return text[: i + 1]
    return text


def _strip_optional(kind: Any) -> Any:
    """``X | None`` → ``X`` (other annotations unchanged)."""
    if get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def choices_of(kind: Any) -> tuple[Any, ...] | None:
    """The values of a ``Literal`` annotation (also inside ``X | None``), else ``None``."""
    kind = _strip_optional(kind)
    return get_args(kind) if get_origin(kind) is Literal else None


def _arg_type(kind: Any) -> Callable[[str], Any]:
    kind = _strip_optional(kind)
    choices = choices_of(kind)
    if choices is not None:
        base = type(choices[0])
        return parse_bool if base is bool else base
    if kind is bool:
        return parse_bool
    if kind in (int, float, str):
        return kind
    return str


def check_choices(obj: Any, skip: Sequence[str] = ()) -> None:
    """Raise :class:`rdcore.ConfigError` if a ``Literal``-annotated field of the dataclass
    instance ``obj`` (not in ``skip``) holds a value outside its choices (the one check for every
    choice field)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        kind = hints[f.name]
        choices = choices_of(kind)
        value = getattr(obj, f.name)
        optional = _strip_optional(kind) is not kind
        if choices is not None and value not in choices and not (value is None and optional):
            raise ConfigError(f"{f.name} must be one of {', '.join(map(str, choices))}; got "
                              f"{value!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = (),
                  suppress_defaults: bool = False) -> None:
    """One ``--flag`` per field of ``cls`` (not in ``skip``), grouped by the fields' ``group``
    metadata. ``suppress_defaults``: flags not given are absent from the parsed namespace (so a
    config file can fill them), else they take the field's default."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        group_name = f.metadata.get("group")
        target: Any = parser
        if group_name:
            if group_name not in groups:
                groups[group_name] = parser.add_argument_group(group_name)
            target = groups[group_name]
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        shown = {True: "on", False: "off"}.get(default, default) if isinstance(default, bool) \
            else default
        text = first_sentence(docs.get(f.name, "")).replace("%", "%%")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        hidden = f.metadata.get("hidden", False)  # internal (e.g. a benchmark's worker mode)
        target.add_argument(
            f"--{f.name}", type=_arg_type(kind), metavar=_metavar(kind),
            default=argparse.SUPPRESS if (suppress_defaults or required) else default,
            help=argparse.SUPPRESS if hidden else
            f"{text} (default: {shown if not required else 'required'})")


def _metavar(kind: Any) -> str:
    """What the flag takes: its choices, on|off, N, X or TEXT."""
    choices = choices_of(kind)
    if choices is not None:
        return "|".join(map(str, choices))
    kind = _strip_optional(kind)
    return {bool: "on|off", int: "N", float: "X"}.get(kind, "TEXT")


def namespace_values(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The parsed values that are fields of ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(ns).items() if k in names}


def build(cls: type[T], values: dict[str, Any], where: str = "flags") -> T:
    """``cls(**values)``; a missing/unknown field or a bad value is a :class:`ConfigError`."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}")
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                     and f.name not in values)
    if missing:
        raise ConfigError(f"{where}: missing {', '.join('--' + m for m in missing)}")
    hints = typing.get_type_hints(cls)
    fixed = {}
    for name, value in values.items():  # a config file's "on"/"off" for a bool field
        kind = _strip_optional(hints[name])
        if kind is bool and isinstance(value, str):
            try:
                value = parse_bool(value)
            except argparse.ArgumentTypeError as err:
                raise ConfigError(f"{where}: {name}: {err}") from None
        fixed[name] = value
    try:
        return cls(**fixed)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None


def load_config_file(path: str, cls: type) -> dict[str, Any]:
    """A JSON or YAML file of ``{field: value}`` for the dataclass ``cls``; unknown fields, a
    missing file and a parse error are :class:`ConfigError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8-sig")
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # decoding, JSON and YAML errors alike
        raise ConfigError(f"{path}: cannot parse ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field names to values")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {unknown}")
    return data


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help lines beside wide flags, the description as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=44, width=110)


def parser_for(cls: type, *, prog: str, description: str, config_file: bool = False,
               skip: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser of ``cls``'s flags (``config_file``: plus ``--config FILE``, whose values the
    flags override)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, usage=f"{prog} [-h]"
        + (" [--config FILE]" if config_file else "") + " [--FLAG VALUE ...]",
        formatter_class=_Formatter)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    if config_file:
        parser.add_argument("--config", default=None, metavar="FILE",
                            help="JSON or YAML file of {field: value} (the flags' names); "
                                 "flags given as well override it")
    add_arguments(parser, cls, skip=skip, suppress_defaults=config_file)
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None, *, prog: str, description: str,
                 config_file: bool = False) -> T:
    """Parse ``argv`` into a ``cls``: defaults < ``--config`` file < flags."""
    ns = parser_for(cls, prog=prog, description=description, config_file=config_file).parse_args(
        argv)
    values: dict[str, Any] = {}
    if config_file and ns.config:
        values.update(load_config_file(ns.config, cls))
    values.update(namespace_values(ns, cls))
    return build(cls, values)
