"""The whole run config: the sections (``peft_dist.config``) and the adapters, each validated by its method's
config class from the adapter registry. Everything here runs before any process group starts."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from peft_dist.adapters.registry import build_adapter_config
from peft_dist.config.load import build_sections, load_config_dict
from peft_dist.config.schema import ConfigError, RunConfig


def build_run_config(data: Any) -> RunConfig:
    """Convert a plain mapping (parsed YAML plus overrides) into a validated ``RunConfig``."""
    sections, raw_adapters = build_sections(data)
    adapters = [build_adapter_config(item, f"adapters.{i}") for i, item in enumerate(raw_adapters)]
    for i, adapter in enumerate(adapters):
        try:
            adapter.check_training(sections["train"])
        except ConfigError as err:
            raise ConfigError(f"adapters.{i}.{err}") from None
    names = [a.name for a in adapters]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(f"adapters: name {duplicated[0]!r} is used twice; give each adapter its own name")
    return RunConfig(adapters=adapters, **sections)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Load, override and validate a run config. ``path=None`` gives the embedded default."""
    return build_run_config(load_config_dict(path, overrides))
