"""Reading every config the same way: YAML, ``base:`` composition, ``vars:``, overrides, types.

``load_yaml_config(RunConfig, "configs/demo.yaml", ["optim.lr=3e-4"])`` reads the file, merges
its ``base:`` chain, applies ``key=value`` overrides, substitutes ``${var}`` from ``vars:``,
resolves ``@embedded/`` paths and builds the dataclass, validating every key and type; any
mistake is a :class:`~basque_jax.errors.ConfigError` of one line naming the file and the key
(``configs/demo.yaml: train.steps: expected int, got str 'ten'``).

* ``base: other.yaml`` (or a list, relative to the file) gives values the file overrides; a key
  written ``name+:`` extends the base's value instead (lists concatenate, numbers add).
* ``${name}`` in any string is a key of the top-level ``vars:`` mapping (override it with
  ``vars.name=...``) or ``${config_name}`` (the config file's stem).
* A string starting with ``@embedded/`` names a file of the package's embedded Basque sample.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from basque_jax.errors import ConfigError, InputNotFound, UserError

T = TypeVar("T")
EMBEDDED_PREFIX = "@embedded/"
EMBEDDED_DIR = Path(__file__).resolve().parent / "assets"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` as a float (YAML 1.1 wants ``1.0e-5``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$|^[-+]?\d*\.\d+$|^[-+]?\.(?:inf|Inf)$"
               r"|^\.(?:nan|NaN)$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


# ----------------------------------------------------------------------------- composition
def _extend(key: str, old: Any, value: Any) -> Any:
    """``key+: value`` over a base value ``old``: lists concatenate, numbers add."""
    if old is None:
        return value
    if isinstance(old, list) and isinstance(value, list):
        return old + value
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (old, value))
    if numbers:
        return old + value
    raise ConfigError(f"{key}+: cannot extend {type(old).__name__} {old!r} with "
                      f"{type(value).__name__} {value!r} (lists or numbers only)")


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base`` (mappings merged key by key, ``key+`` extends)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(key, str) and key.endswith("+"):
            name = key[:-1]
            out[name] = _extend(name, out.get(name), merge({}, value)
                                if isinstance(value, dict) else value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping with its ``base:`` chain resolved (cycles are an error)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: base cycle through {' -> '.join(map(str, _seen))}")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        d = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = d.pop("base", None)
    if base is None:
        return merge({}, d)
    merged: dict[str, Any] = {}
    for b in [base] if isinstance(base, str) else list(base):
        merged = merge(merged, read_yaml(path.parent / b, (*_seen, path)))
    return merge(merged, d)


def apply_overrides(d: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (values parsed as YAML scalars/lists)."""
    out = merge({}, d)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        try:
            value = parse_yaml(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: {' '.join(str(e).split())}") from None
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return out


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def interpolate(d: dict[str, Any], config_name: str) -> dict[str, Any]:
    """Substitute ``${name}`` in every string from the top-level ``vars:`` mapping (which is
    removed; vars may use each other) and ``${config_name}``; resolve ``@embedded/`` paths."""
    d = dict(d)
    variables = d.pop("vars", None) or {}
    if not isinstance(variables, dict):
        raise ConfigError(f"vars: expected a mapping, got {type(variables).__name__}")
    table = {"config_name": config_name, **{str(k): v for k, v in variables.items()}}

    def sub(value: Any, where: str, depth: int = 0) -> Any:
        if isinstance(value, dict):
            return {k: sub(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [sub(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, str):
            return value
        if value.startswith(EMBEDDED_PREFIX):
            return str(EMBEDDED_DIR / value[len(EMBEDDED_PREFIX):])
        if "${" not in value:
            return value
        if depth > 10:
            raise ConfigError(f"{where}: ${{...}} variables nest too deep (a cycle?)")

        def one(m: re.Match) -> str:
            if m.group(1) not in table:
                raise ConfigError(f"{where}: unknown variable ${{{m.group(1)}}}; define it "
                                  f"under vars: (known: {', '.join(sorted(table))})")
            return str(table[m.group(1)])

        return sub(_VAR.sub(one, value), where, depth + 1)

    return sub(d, "")


def load_yaml_config(cls: type[T], path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                     *, section: str | None = None,
                     check: Callable[[dict[str, Any]], None] | None = None) -> T:
    """Read, compose, override and validate ``path`` into ``cls`` (see the module docstring).

    ``section``: build ``cls`` from that top-level key when the file has it (a filter config
    may stand alone or sit under ``filters:`` of a generate config). ``check``: a test of the
    raw mapping before it is built (rules between keys). Errors name the file.
    """
    try:
        d = read_yaml(path)
        if section is not None and isinstance(d.get(section), dict):  # overrides are relative
            d = {**d[section], **({"vars": d["vars"]} if "vars" in d else {})}
        d = interpolate(apply_overrides(d, list(overrides)), Path(path).stem)
        if check is not None:
            check(d)
        return build(cls, d, section or "")
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(str(Path(path).resolve())) else
                          f"{path}: {msg}") from None


def read_json_object(path: str | Path, error: type[UserError] = ConfigError) -> dict[str, Any]:
    """A JSON file holding an object (``config.json``, ``adapter_config.json`` ...);
    ``error`` naming the file when it is not valid JSON or not an object."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"{path}: file not found")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: invalid JSON ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object")
    return d


# ----------------------------------------------------------------------------- validation
def build(cls: type[T], d: Any, where: str = "") -> T:
    """``cls(**d)`` with every key known and every value of its annotated type (recursively
    for nested dataclasses); ConfigError naming the dotted key otherwise."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{_key(where, unknown[0])}: unknown key (known: "
                          f"{', '.join(sorted(known))})")
    kwargs = {k: _check(v, hints[k], _key(where, k)) for k, v in d.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where and not str(e).startswith(where) else
                          str(e)) from None
    except TypeError as e:  # a missing required key
        missing = re.findall(r"'(\w+)'", str(e))
        raise ConfigError(f"{where or 'config'}: required key "
                          f"{', '.join(map(repr, missing)) or '?'} missing") from None


def _key(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _check(value, a, where)
            except ConfigError:
                continue
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigError(f"{where}: expected {names}, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got bool {value!r}")
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return "list"
    return getattr(tp, "__name__", str(tp))
