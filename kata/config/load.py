"""Find, parse and validate configuration.toml; dump it back for ``kata-runtime env``."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kata.config.model import (
    SUPPORTED_AGENTS,
    SUPPORTED_HYPERVISORS,
    AgentConfig,
    ConfigError,
    FactoryConfig,
    HypervisorConfig,
    RuntimeConfig,
    RuntimeSection,
    agent_problems,
    factory_problems,
    hypervisor_problems,
    runtime_problems,
)

ENV_CONF_FILE = "KATA_CONF_FILE"
# Kata's lookup order: the administrator's file first, then the distribution's defaults.
SYSTEM_CONFIG_PATHS = (
    Path("/etc/kata-containers/configuration.toml"),
    Path("/usr/share/defaults/kata-containers/configuration.toml"),
)
PACKAGED_CONFIG = Path(__file__).with_name("configuration-qemu.toml")


def find_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    search: Sequence[Path] = SYSTEM_CONFIG_PATHS,
) -> Path:
    """The file load_config would read. An explicitly named file (argument or env) must exist."""
    env = os.environ if env is None else env
    explicit = path if path is not None else (Path(env[ENV_CONF_FILE]) if env.get(ENV_CONF_FILE) else None)
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"{explicit}: configuration file not found")
        return explicit
    for candidate in search:
        if candidate.is_file():
            return candidate
    return PACKAGED_CONFIG


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    search: Sequence[Path] = SYSTEM_CONFIG_PATHS,
) -> RuntimeConfig:
    source = find_config(path, env=env, search=search)
    try:
        with source.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror}") from None
    return parse_config(data, source)


def parse_config(data: Mapping[str, Any], source: Path) -> RuntimeConfig:
    """Build and validate a RuntimeConfig from parsed TOML; ``source`` names the file in errors."""
    hv_name, hv_table = _one_subsection(data, "hypervisor", SUPPORTED_HYPERVISORS, source, required=True)
    agent_name, agent_table = _one_subsection(data, "agent", SUPPORTED_AGENTS, source, required=False)
    rt_table = data.get("runtime", {})
    if not isinstance(rt_table, dict):
        raise ConfigError(f"{source}: runtime: must be a table")

    hv_where = f"{source}: hypervisor.{hv_name}"
    hv = HypervisorConfig(name=hv_name, **_read(hv_table, HypervisorConfig, hv_where))
    agent = AgentConfig(name=agent_name, **_read(agent_table, AgentConfig, f"{source}: agent.{agent_name}"))
    rt = RuntimeSection(**_read(rt_table, RuntimeSection, f"{source}: runtime"))
    factory_table = data.get("factory", {})
    if not isinstance(factory_table, dict):
        raise ConfigError(f"{source}: factory: must be a table")
    factory = FactoryConfig(**_read(factory_table, FactoryConfig, f"{source}: factory"))

    for section, problems in (
        (f"hypervisor.{hv_name}", hypervisor_problems(hv)),
        (f"agent.{agent_name}", agent_problems(agent)),
        ("runtime", runtime_problems(rt)),
        ("factory", factory_problems(factory)),
    ):
        if problems:
            key, reason = problems[0]
            raise ConfigError(f"{source}: {section}.{key}: {reason}")
    return RuntimeConfig(hypervisor=hv, agent=agent, runtime=rt, source=source, factory=factory)


def dump_config(cfg: RuntimeConfig) -> dict[str, Any]:
    """The effective configuration in configuration.toml's layout (lists, not tuples), for TOML or JSON."""

    def table(obj: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            if f.name == "name":
                continue
            value = getattr(obj, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    return {
        "meta": {"source": str(cfg.source)},
        "hypervisor": {cfg.hypervisor.name: table(cfg.hypervisor)},
        "agent": {cfg.agent.name: table(cfg.agent)},
        "runtime": table(cfg.runtime),
        "factory": table(cfg.factory),
    }


def _one_subsection(
    data: Mapping[str, Any], kind: str, supported: tuple[str, ...], source: Path, *, required: bool
) -> tuple[str, dict[str, Any]]:
    tables = data.get(kind)
    if tables is None and not required:
        return supported[0], {}
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"{source}: missing [{kind}.{supported[0]}] section")
    for name, table in tables.items():
        if name not in supported:
            known = ", ".join(supported)
            raise ConfigError(f"{source}: {kind}.{name}: unsupported {kind} (supported: {known})")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {kind}.{name}: must be a table")
    # Only supported names remain, and each appears once in a TOML table.
    name = next(iter(tables))
    return name, tables[name]


def _read(table: Mapping[str, Any], cls: type, where: str) -> dict[str, Any]:
    """Keyword arguments for ``cls`` from the keys of ``table`` that it knows, type-checked.

    Unknown keys are ignored: Kata's files carry many that this runtime does not implement.
    """
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "name" or f.name not in table:
            continue
        kwargs[f.name] = _coerce(table[f.name], str(f.type), f"{where}.{f.name}")
    return kwargs


def _coerce(value: Any, type_name: str, where: str) -> Any:
    # bool is an int subclass in Python; TOML keeps them apart and so do we.
    if type_name == "str":
        ok = isinstance(value, str)
    elif type_name == "bool":
        ok = isinstance(value, bool)
    elif type_name == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif type_name == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif type_name == "tuple[str, ...]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
        type_name = "array of strings"
    else:  # pragma: no cover - a field type this reader does not know is a programming error
        raise TypeError(f"unsupported config field type {type_name}")
    if not ok:
        article = "an" if type_name[0] in "aeiou" else "a"
        raise ConfigError(f"{where}: must be {article} {type_name}, got {value!r}")
    return value
