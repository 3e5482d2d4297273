"""Device profiles (targets): TOML files checked on load, so a typo is one clear error and never a silent default.

One layout for every backend::

    description = "..."            # one line for `vitexport targets`
    base = "x86-cpu"               # optional: start from another profile (by name, or a path beside this file)
    backend = "onnxruntime"        # a registered backend
    precisions = ["fp32", "int8"]  # precisions of that backend
    threads = 4                    # optional: runtime threads

    [options.<backend>]            # the backend's settings (its declared `settings`)
    [options.<backend>.<precision>]  # that precision's settings (its Capability's `settings`) and
    recipe = { ... }               # overrides of its core recipe class (its Capability's `recipe`)

Shipped profiles live in the package (``vitexport/targets/*.toml``, read with importlib.resources, so a wheel
install has them); a user profile is any .toml path. Every key and type is checked against what the backends
declare; values are checked by building the settings and recipe objects themselves.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from . import backends as _backends
from .errors import VitexportError

PACKAGE_DIR = "targets"  # inside the vitexport package
TOP_LEVEL: dict[str, str] = {
    "description": "str",
    "base": "str",
    "backend": "str",
    "precisions": "list[str]",
    "threads": "int",
    "options": "table",
}


class ProfileError(VitexportError):
    """A profile that does not load: the message names the file and the key."""


# ---------------------------------------------------------------- finding profiles


def shipped() -> list[str]:
    """Names of the profiles shipped inside the package."""
    root = importlib.resources.files("vitexport").joinpath(PACKAGE_DIR)
    if not root.is_dir():
        return []
    return sorted(p.name.removesuffix(".toml") for p in root.iterdir() if p.name.endswith(".toml"))


def _read(name_or_path: str, relative_to: Path | None = None) -> tuple[str, str, str]:
    """(name, where, text) of a profile given by path (tried first) or by shipped name."""
    for cand in ([relative_to / name_or_path] if relative_to else []) + [Path(name_or_path)]:
        if (cand.suffix == ".toml" or "/" in name_or_path) and cand.is_file():  # a bare word is a shipped name
            return cand.stem, str(cand), cand.read_text()
    res = importlib.resources.files("vitexport").joinpath(PACKAGE_DIR, f"{name_or_path}.toml")
    if res.is_file():
        return name_or_path, f"vitexport/{PACKAGE_DIR}/{name_or_path}.toml", res.read_text()
    known = shipped()
    hint = _did_you_mean(name_or_path, known)
    raise ProfileError(f"unknown target '{name_or_path}'{hint}: choose one of {', '.join(known) or '(none installed)'} or pass a .toml file")


# ---------------------------------------------------------------- loading


def load(name_or_path: str) -> dict[str, Any]:
    """A checked profile, with its ``base`` chain merged in: {"name", "description", "backend", "precisions", ...}."""
    profile, where = _load_merged(name_or_path, None, ())
    profile.pop("base", None)
    check(profile, where)
    name = Path(name_or_path).stem if name_or_path.endswith(".toml") or "/" in name_or_path else name_or_path
    return {"name": name, **profile}


def _load_merged(name_or_path: str, relative_to: Path | None, chain: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    import tomllib

    name, where, text = _read(name_or_path, relative_to)
    if where in chain:
        raise ProfileError(f"{where}: base = \"{name_or_path}\" makes a cycle ({' -> '.join(chain + (where,))})")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{where} is not valid TOML: {e}") from None
    _check_top(data, where)
    check_options(data.get("options") or {}, where)  # each file's own tables, so an error names the file that has it
    base = data.get("base")
    if base is None:
        return data, where
    try:
        parent, _ = _load_merged(base, Path(where).parent if Path(where).is_file() else None, chain + (where,))
    except ProfileError as e:
        if str(e).startswith("unknown target"):  # name the file whose `base` it is
            raise ProfileError(f"{where}: base: {e}") from None
        raise
    return _merge(parent, data), where


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: tables merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


# ---------------------------------------------------------------- checking


def check(profile: Mapping[str, Any], where: str) -> None:
    """Every key and type of a merged profile against the backends' declarations; raises ProfileError."""
    _check_top(profile, where)
    if "backend" not in profile:
        raise ProfileError(f"{where}: missing key 'backend': choose one of {', '.join(_backends.names())}")
    backend = _backend(profile["backend"], where, "backend")
    for p in profile.get("precisions", ()):
        if p not in backend.precisions:
            raise ProfileError(f"{where}: precisions: {backend.name} has no precision {p!r}{_did_you_mean(p, backend.precisions)}: choose from {', '.join(backend.precisions)}")
    if profile.get("threads") is not None and profile["threads"] < 1:
        raise ProfileError(f"{where}: threads must be at least 1, not {profile['threads']}")
    check_options(profile.get("options") or {}, where)


def check_options(options: Mapping[str, Any], where: str) -> None:
    """``[options.*]`` tables: one per registered backend, each with its settings and its precisions' tables."""
    for name, table in options.items():
        key = f"options.{name}"
        if name not in _backends.names():
            extra = f" (precision tables go under [options.<backend>.{name}])" if _is_precision(name) else ""
            raise ProfileError(f"{where}: unknown table [{key}]{_did_you_mean(name, _backends.names())}{extra}: allowed are {', '.join(f'[options.{n}]' for n in _backends.names())}")
        _expect_table(table, where, key)
        backend = _backends.get(name)
        settings = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
        tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
        fields = _fields(backend.settings)
        precision_tables = [p for p, cap in backend.capabilities.items() if cap.recipe or cap.settings]
        _check_keys(settings, fields, where, key, extra=precision_tables)
        _build(backend.settings, settings, where, key)
        for precision, sub in tables.items():
            _check_precision(backend, precision, sub, where, f"{key}.{precision}", fields, precision_tables)


def _check_precision(backend, precision: str, table: Mapping[str, Any], where: str, key: str, fields, precision_tables) -> None:
    cap = backend.capabilities.get(precision)
    if cap is None or not (cap.recipe or cap.settings):
        if precision in fields:
            raise ProfileError(f"{where}: {key} must be a {fields[precision][0]}, not a table")
        allowed = ", ".join(f"[{key.rsplit('.', 1)[0]}.{p}]" for p in precision_tables) or "none"
        why = f"{backend.name} {precision} has no settings" if cap else f"{backend.name} has no precision {precision!r}"
        raise ProfileError(f"{where}: unknown table [{key}]{_did_you_mean(precision, precision_tables)}: {why}; precision tables allowed: {allowed}")
    allowed = dict(_fields(dict(cap.settings)))
    if cap.recipe:
        allowed["recipe"] = ("table", None)
    _check_keys({k: v for k, v in table.items()}, allowed, where, key)
    if cap.recipe and "recipe" in table:
        _expect_table(table["recipe"], where, f"{key}.recipe")
        cls = _backends.load_class(cap.recipe)
        _check_keys(dict(table["recipe"]), _fields(cls), where, f"{key}.recipe")
        _build(cls, dict(table["recipe"]), where, f"{key}.recipe")


def _check_top(data: Mapping[str, Any], where: str) -> None:
    _check_keys(data, {k: (t, None) for k, t in TOP_LEVEL.items()}, where, "")


def _check_keys(table: Mapping[str, Any], fields: Mapping[str, tuple[str, Any]], where: str, key: str, extra: list[str] = ()) -> None:
    for k, v in table.items():
        full = f"{key}.{k}" if key else k
        if k not in fields:
            names = sorted(fields) + [f"[{key}.{p}]" for p in extra]
            raise ProfileError(f"{where}: unknown key '{full}'{_did_you_mean(k, list(fields) + list(extra))}: allowed {'here' if key else 'at the top level'} are {', '.join(names) or 'none'}")
        want, _ = fields[k]
        if not _type_ok(v, want):
            raise ProfileError(f"{where}: {full} must be {_article(want)}, not {_toml_type(v)} {v!r}")


def _expect_table(v: Any, where: str, key: str) -> None:
    if not isinstance(v, Mapping):
        raise ProfileError(f"{where}: {key} must be a table, not {_toml_type(v)} {v!r}")


def _build(cls: Any, values: Mapping[str, Any], where: str, key: str) -> None:
    """Values, not just types: build the settings or recipe object (its own checks run in __post_init__)."""
    if not dataclasses.is_dataclass(cls):
        return
    try:
        cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except (VitexportError, ValueError, TypeError) as e:
        raise ProfileError(f"{where}: [{key}]: {e}") from None


# ---------------------------------------------------------------- types


def _fields(schema: Any) -> dict[str, tuple[str, Any]]:
    """name -> (type word, default) of a settings dataclass or a mapping of defaults."""
    if dataclasses.is_dataclass(schema):
        hints = _hints(schema)
        return {f.name: (_type_word(hints.get(f.name), f.default), f.default) for f in dataclasses.fields(schema)}
    return {k: (_type_word(None, v), v) for k, v in dict(schema or {}).items()}


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an unresolvable annotation: fall back to the defaults' types
        return {}


def _type_word(hint: Any, default: Any) -> str:
    """'bool' | 'int' | 'float' | 'str' | 'list[...]' | 'table' | 'any', from a type hint or else the default."""
    if hint is not None:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        origin = typing.get_origin(hint)
        if origin in (tuple, list):
            inner = [a for a in args if a is not Ellipsis]
            return f"list[{_type_word(inner[0], None) if inner else 'any'}]"
        if origin in (typing.Union, types.UnionType) and len(args) == 1:
            return _type_word(args[0], default)
        if origin in (dict, Mapping):
            return "table"
        if hint in (bool, int, float, str):
            return hint.__name__
        if origin is typing.Literal:
            return "str"
        if origin is not None or args:
            return "any"
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, (int, float, str)):
        return type(default).__name__
    if isinstance(default, (tuple, list)):
        kinds = {_type_word(None, x) for x in default}
        return f"list[{kinds.pop() if len(kinds) == 1 else 'any'}]"
    if isinstance(default, Mapping):
        return "table"
    return "any"


def _type_ok(v: Any, want: str) -> bool:
    if want == "any":
        return True
    if want == "bool":
        return isinstance(v, bool)
    if want == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if want == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if want == "str":
        return isinstance(v, str)
    if want == "table":
        return isinstance(v, Mapping)
    if want.startswith("list["):
        return isinstance(v, list) and all(_type_ok(x, want[5:-1]) for x in v)
    return False


def _toml_type(v: Any) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, Mapping):
        return "a table"
    return f"a {type(v).__name__}"


def _article(want: str) -> str:
    words = {"bool": "a boolean (true/false)", "int": "an integer", "float": "a number", "str": "a string", "table": "a table"}
    if want.startswith("list["):
        return f"an array of {want[5:-1]}"
    return words.get(want, want)


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _is_precision(name: str) -> bool:
    return any(name in _backends.get(n).capabilities for n in _backends.names())


def _backend(name: Any, where: str, key: str):
    if not isinstance(name, str) or name not in _backends.names():
        raise ProfileError(f"{where}: {key} = {name!r} is not a backend{_did_you_mean(str(name), _backends.names())}: choose one of {', '.join(_backends.names())}")
    return _backends.get(name)
