"""YAML loading, ``--set a.b=value`` overrides and strict conversion into the typed dataclasses.

Everything here runs before any process group starts, so a typo costs seconds, not a queue slot.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from peft_dist.config.schema import SECTIONS, ConfigError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; every ML config writes learning rates that way."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` is acceptable for the annotation ``tp`` (ints are accepted as floats)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is list:
        return isinstance(value, list)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def build_dataclass(cls: type, data: Any, path: str) -> Any:
    """Build ``cls`` from a mapping, refusing unknown keys and ill-typed values.

    ``path`` is the dotted location (``train``, ``adapters.0``) used in error messages.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(
            f"{path}.{unknown[0]}: unknown key. Valid keys of '{path}' are: {', '.join(sorted(fields))}")
    for key, value in data.items():
        if not _matches(value, hints[key]):
            raise ConfigError(f"{path}.{key}: expected {_type_name(hints[key])}, got {value!r} "
                              f"({type(value).__name__})")
    try:
        return cls(**data)
    except ConfigError as err:
        raise ConfigError(f"{path}.{err}") from None


def build_sections(data: Any) -> tuple[dict[str, Any], list]:
    """The validated sections of a plain mapping (parsed YAML plus overrides), and its raw ``adapters`` list
    (which the adapter registry validates: ``peft_dist.train.config.build_run_config``)."""
    if not isinstance(data, dict):
        raise ConfigError("config: the top level must be a mapping of sections")
    allowed = set(SECTIONS) | {"adapters"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section. Valid sections: {', '.join(sorted(allowed))}")
    raw_adapters = data.get("adapters") or []
    if not isinstance(raw_adapters, list):
        raise ConfigError("adapters: expected a list of adapter configs, each with a 'method' key")
    return {name: build_dataclass(cls, data.get(name), name) for name, cls in SECTIONS.items()}, raw_adapters


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (``1e-3``, ``[q, v]``)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set train.lr=1e-3")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    value = parse_yaml(raw) if raw.strip() else ""
    node: Any = data
    for depth, key in enumerate(keys[:-1]):
        where = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"--set {dotted}: '{where}' indexes a list of {len(node)} items")
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {dotted}: '{where}' is a value, not a section")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {dotted}: index {last} is outside a list of {len(node)} items")
        node[int(last)] = value
    else:
        node[last] = value


def load_config_dict(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """Read YAML (or nothing, for the embedded default) and apply overrides, without validating."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file; see configs/ for examples")
        try:
            data = parse_yaml(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"--config {path}: not UTF-8 text (byte {err.start}); a run config is a YAML "
                              "file, see configs/") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path}: expected a mapping of sections (model:, adapters:, ...), "
                              f"got {type(data).__name__}; see configs/")
    else:
        data = default_config_dict()
    for assignment in overrides:
        apply_override(data, assignment)
    return data


def default_config_dict() -> dict:
    """The embedded default run: LoRA on every decoder linear of the shipped pretrained base (int8), trained on
    the docstrings corpus it never saw (both the schema's defaults), on CPU."""
    return {"adapters": [{"method": "lora", "name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}]}


def config_to_dict(config: Any) -> Any:
    """Plain-data view of a config (dataclasses, lists, dicts), for YAML dumps and tracking."""
    if dataclasses.is_dataclass(config):
        out = {f.name: config_to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
        method = getattr(type(config), "method", None)
        return {"method": method, **out} if method else out
    if isinstance(config, list):
        return [config_to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: config_to_dict(v) for k, v in config.items()}
    return config


def json_sha256(value: Any) -> str:
    """The sha256 of ``value`` as sorted-key JSON (anything JSON cannot hold as its ``str``): the digest that
    cache keys, base identities and checkpoint manifests record."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}, 'c': [x]}`` -> ``{'a.b': 1, 'c.0': x}`` (for tracker params)."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = ((str(i), v) for i, v in enumerate(data))
    else:
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
