"""Options declared once: dataclass fields carrying help, type, range and choices, and everything derived.

A config class declares each option with :func:`option`; from those fields come

* :func:`from_dict`: the one loader and coercion for config files, run-file sections and flags (one set of
  rules, one error format ``<source>: <field> must be ...``, unknown keys are errors);
* :func:`check_fields`: the range and choice checks of :meth:`validate` (messages name the option as the
  user wrote it: ``--max-steps`` on the command line, ``run.chunk_words`` in a run file);
* :func:`add_arguments`: the ``--flag`` of every field for argparse (the same type, range and choices).

Keys may be spelt with ``-`` or ``_`` (``max-steps`` = ``max_steps``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import field, fields
from typing import Any

from radit_fast.io import RaditError, require_file

_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


def option(default: Any, help: str, *, choices: Iterable[str] | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None, flag: str | None = None,
           negatable: bool = True) -> Any:
    """A dataclass field with its help, allowed values (``choices``, bounds ``ge``/``gt``/``le``/``lt``) and
    command-line spelling (``flag``, default ``--name-with-dashes``; ``negatable=False``: a bool is a plain
    ``store_true`` switch, without ``--no-...``)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "ge": ge, "gt": gt,
            "le": le, "lt": lt, "flag": flag, "negatable": negatable}
    return field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a field."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def base_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, optional) of an annotation such as ``int | None``."""
    args = typing.get_args(tp)
    if args:
        non_none = [a for a in args if a is not type(None)]
        return non_none[0], len(non_none) < len(args)
    return tp, False


# ------------------------------------------------------------------------------------------ coercion
def coerce(name: str, value: Any, tp: Any, source: str) -> Any:
    """``value`` as the annotated type ``tp`` (``int | None``, ``float``, ``bool``, ``str``), the one set of
    rules for files, run files and flags; RaditError ``<source>: <name> must be ...`` otherwise."""
    base, optional = base_type(tp)
    if value is None:
        if optional:
            return None
        raise RaditError(f"{source}: {name} cannot be null")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise RaditError(f"{source}: {name} must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise RaditError(f"{source}: {name} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise RaditError(f"{source}: {name} must be an integer, got {value!r}") from None
    if base is float:
        if isinstance(value, bool):
            raise RaditError(f"{source}: {name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RaditError(f"{source}: {name} must be a number, got {value!r}") from None
    if base is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise RaditError(f"{source}: {name} must be a string, got {value!r}")
    return value


C = typing.TypeVar("C")


def from_dict(cls: type[C], data: Mapping[str, Any], *, source: str, base: C | None = None) -> C:
    """``cls`` from ``data`` (flat ``name: value``) over ``base`` (else the defaults); unknown keys and
    wrong types are RaditErrors naming ``source``."""
    types = field_types(cls)
    values = dataclasses.asdict(base) if base is not None else {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in types:
            raise RaditError(f"{source}: unknown option {key!r}")
        values[name] = coerce(name, value, types[name], source)
    return cls(**values)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``/``.json``) or TOML (``.toml``) file; RaditError when unreadable."""
    p = require_file(path, "config file")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RaditError(f"{p}: invalid TOML ({e})") from None
    elif p.suffix.lower() in (".yaml", ".yml", ".json"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise RaditError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
        data = {} if data is None else data
    else:
        raise RaditError(f"{p}: config files must end in .yaml, .yml, .toml or .json")
    if not isinstance(data, dict):
        raise RaditError(f"{p}: expected a mapping of option names to values")
    return data


# ---------------------------------------------------------------------------------------- validation
def _bounds(meta: Mapping[str, Any]) -> str | None:
    """``>= 0``, ``> 0``, ``in [0, 1)`` ... of a field's declared range (None: unbounded)."""
    lo = ("[", meta["ge"]) if meta.get("ge") is not None else ("(", meta["gt"]) if meta.get("gt") is not None else None
    hi = ("]", meta["le"]) if meta.get("le") is not None else (")", meta["lt"]) if meta.get("lt") is not None else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]}"
    if hi:
        return f"{'<=' if hi[0] == ']' else '<'} {hi[1]}"
    return None


def _in_range(meta: Mapping[str, Any], x: float) -> bool:
    return not ((meta.get("ge") is not None and not x >= meta["ge"]) or (meta.get("gt") is not None and not x > meta["gt"])
                or (meta.get("le") is not None and not x <= meta["le"])
                or (meta.get("lt") is not None and not x < meta["lt"]))


def check_value(meta: Mapping[str, Any], label: str, value: Any) -> None:
    """RaditError ``<label> must be ...`` when ``value`` is outside the declared choices or range."""
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise RaditError(f"{label} must be one of {'|'.join(choices)}, got {value!r}")
    bounds = _bounds(meta)
    if bounds is not None and not _in_range(meta, value):
        raise RaditError(f"{label} must be {bounds}, got {value}")


def check_fields(cfg: Any, label: Callable[[dataclasses.Field], str] = flag_of) -> None:
    """Every field of ``cfg`` against its declared choices and range; ``label`` names a field in messages
    (default: its flag, ``--max-steps``)."""
    for f in fields(cfg):
        check_value(f.metadata, label(f), getattr(cfg, f.name))


# ------------------------------------------------------------------------------------- command line
def arg_type(base: type, meta: Mapping[str, Any]) -> Callable[[str], Any]:
    """argparse ``type=``: a scalar type and a range (``{"ge": 1}``), argparse reporting ``argument --k: ...``."""
    bounds = _bounds(meta)
    what = "an integer" if base is int else "a number" if base is float else "a string"

    def parse(text: str) -> Any:
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}{' ' + bounds if bounds else ''}, "
                                             f"got {text!r}") from None
        if bounds is not None and not _in_range(meta, value):
            raise argparse.ArgumentTypeError(f"expected {what} {bounds}, got {text!r}")
        return value

    parse.__name__ = base.__name__  # argparse names the type in its messages
    return parse


def positive_int(text: str, *, words: tuple[str, ...] = ()) -> int | str:
    """argparse ``type=``: a positive integer, or one of ``words`` (``("auto",)``) as given."""
    if text in words:
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        what = " or ".join(["a positive integer", *words])
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return n


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                  only: Iterable[str] | None = None, skip: Iterable[str] = (), defaults: bool = False,
                  shown: Mapping[str, Any] | None = None, dests: Mapping[str, str] | None = None) -> None:
    """One ``--flag`` per field of ``cls`` (``only`` those, in that order, or all but ``skip``).

    ``defaults=False``: every flag defaults to None, so that an unset flag never overrides a config file
    (the help still states the field's default). ``shown`` (by dest) replaces the default the help states;
    ``dests`` renames the argparse dest of a field (``batch_size`` -> ``eval_batch_size``).
    """
    by_name = {f.name: f for f in fields(cls)}
    names = list(only) if only is not None else [n for n in by_name if n not in set(skip)]
    types = field_types(cls)
    shown = dict(shown or {})
    dests = dict(dests or {})
    for name in names:
        f = by_name[name]
        dest = dests.get(name, name)
        base, _ = base_type(types[name])
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else None
        if base is bool:
            stated = shown.get(dest, "on" if default else "off")
        else:
            stated = shown.get(dest, default)
        suffix = "" if stated in (None, "") else f" (default {stated})"
        kw: dict[str, Any] = {"dest": dest, "default": default if defaults else None,
                              "help": meta.get("help", "") + suffix}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction if meta.get("negatable", True) else "store_true"
        elif meta.get("choices") is not None:
            kw["choices"] = meta["choices"]
        else:
            kw.update(type=arg_type(base, meta), metavar=dest.upper())
        parser.add_argument(flag_of(f), **kw)
