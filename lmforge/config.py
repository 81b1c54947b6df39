"""Typed configs: YAML sections loaded into frozen dataclasses, checked all at once.

A job config is a frozen dataclass whose fields are section dataclasses (`run`, `model`, `train`,
...). `load_config` reads a YAML file, applies `--set section.key=value` overrides, checks every
value against its field's type, and raises one `LmforgeError` listing every problem (one line
each), each naming
the full key, the value, what is allowed and the file. A section may add cross-field checks with a
`problems(self) -> list[str]` method returning messages of the same shape.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from lmforge.errors import LmforgeError
from lmforge.files import write_atomic

T = TypeVar("T")


def _closest(name: str, options: Sequence[str]) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; known keys: {', '.join(options)}"


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", Path: "a path"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


class _Mismatch(Exception):
    pass


# The strings PyYAML (YAML 1.1) reads as booleans, in lower case as our Literal choices are spelt.
_YAML_BOOL_SPELLINGS = {True: ("on", "yes", "true"), False: ("off", "no", "false")}


def _literal_choice(value: Any, choices: tuple) -> Any:
    """`value` if one of `choices`, or the one choice spelling a YAML bool (`off` is read as False); else _Mismatch."""
    if isinstance(value, bool):
        spelt = [c for c in choices if c in _YAML_BOOL_SPELLINGS[value]]
        if len(spelt) == 1:  # two spellings among the choices: which one was written is lost
            return spelt[0]
    if value in choices:
        return value
    raise _Mismatch


def _coerce(value: Any, tp: Any) -> Any:
    """Returns `value` as type `tp`, or raises _Mismatch."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return _literal_choice(value, typing.get_args(tp))
    if origin in (Union, types.UnionType):
        if isinstance(value, bool) and bool in typing.get_args(tp):
            return value  # a true bool field stays one, whatever Literal shares its union
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin in (tuple, list):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return tuple(_coerce(v, typing.get_args(tp)[0]) for v in value)
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if tp is Path:
        if isinstance(value, (str, Path)) and str(value):
            return Path(value)
        raise _Mismatch
    raise TypeError(f"unsupported config field type {tp!r}")


def _values(value: Any) -> tuple:
    return tuple(value) if isinstance(value, tuple) else (value,)


def _build_section(cls: type, values: Mapping[str, Any], prefix: str, source: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    problems_before = len(problems)
    for key, value in values.items():
        if key not in fields:
            problems.append(f"{source}: unknown key '{prefix}{key}'{_closest(key, list(fields))}")
            continue
        try:
            kwargs[key] = _coerce(value, hints[key])
        except _Mismatch:
            hint = " (YAML reads unquoted on/off/yes/no as true/false)" if isinstance(value, bool) else ""
            problems.append(f"{source}: {prefix}{key} = {value!r}: expected {_describe(hints[key])}{hint}")
            continue
        if any(isinstance(v, float) and not math.isfinite(v) for v in _values(kwargs[key])):
            problems.append(f"{source}: {prefix}{key} = {value!r}: expected a finite number (not nan or inf)")
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{source}: {prefix}{name} is required ({_describe(hints[name])})")
    if len(problems) > problems_before:
        return None  # reported already; the job config is not built
    section = cls(**kwargs)
    check = getattr(section, "problems", None)
    if callable(check):
        problems.extend(f"{source}: {prefix_message}" for prefix_message in check())
    return section


def parse_overrides(overrides: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Turns ["train.lr=3e-4", ...] into {"train": {"lr": 0.0003}}; values are read as YAML."""
    nested: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key.count(".") != 1 or not all(key.split(".")):
            raise LmforgeError(f"--set {item!r}: expected section.key=value, e.g. train.max_steps=100")
        section, name = key.split(".")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        nested.setdefault(section, {})[name] = value
    return nested


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def safe_load_unique(text: str) -> Any:
    """yaml.safe_load, refusing duplicate keys (a yaml.YAMLError naming the key and its line)."""
    loader = _UniqueKeyLoader(text)  # a SafeLoader subclass: only plain YAML types are built
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Reads a YAML file that must hold a mapping; a missing or malformed file, or a key given twice, is one-line error."""
    if not path.is_file():
        raise LmforgeError(f"{path}: config file not found")
    try:
        data = safe_load_unique(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise LmforgeError(f"{path}: byte {err.start}: not valid UTF-8; expected a YAML file") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise LmforgeError(f"{path}{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: expected a mapping of sections (run:, model:, train: ...), got {type(data).__name__}")
    return data


def config_from_mapping(schema: type[T], data: Mapping[str, Any], source: str = "<config>") -> T:
    """Builds `schema` (a dataclass of section dataclasses) from nested dicts; raises one LmforgeError."""
    sections = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    problems: list[str] = []
    built: dict[str, Any] = {}
    for name, values in data.items():
        if name not in sections:
            problems.append(f"{source}: unknown section '{name}'{_closest(name, list(sections))}")
            continue
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            problems.append(f"{source}: section '{name}' must be a mapping of keys, got {values!r}")
            continue
        built[name] = _build_section(hints[name], values, f"{name}.", source, problems)
    for name in sections:
        if name not in built:
            built[name] = _build_section(hints[name], {}, f"{name}.", source, problems)
    if not problems:
        check = getattr(schema, "problems", None)
        config = schema(**built)
        if callable(check):
            problems.extend(f"{source}: {m}" for m in config.problems())
        if not problems:
            return config
    raise LmforgeError("\n".join(problems))  # one `error:` line each


def load_config(schema: type[T], path: Path | None, overrides: Sequence[str] = ()) -> T:
    """Loads `path` (YAML, may be None for defaults only) with `--set` overrides into `schema`."""
    data: dict[str, Any] = read_yaml_mapping(Path(path)) if path is not None else {}
    for section, values in parse_overrides(overrides).items():
        current = data.get(section)
        data[section] = {**(current if isinstance(current, dict) else {}), **values}
    source = str(path) if path is not None else "--set"
    return config_from_mapping(schema, data, source)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain YAML/JSON-able dicts (paths as strings, tuples as lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(config)


def save_config(config: Any, path: Path) -> None:
    """Writes the resolved config as YAML, atomically (temp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    try:
        write_atomic(path, text)
    except OSError as err:
        from lmforge.out_of_space import describe, is_out_of_space

        reason = describe(path.parent, len(text.encode())) if is_out_of_space(err) else f"cannot write ({err.strerror or err})"
        raise LmforgeError(f"{path}: {reason}; nothing else was changed") from None
