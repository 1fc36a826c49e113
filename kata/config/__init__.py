"""configuration.toml (Kata's layout and key names), its defaults, and per-pod annotations."""

from kata.config.annotations import apply_annotations
from kata.config.load import dump_config, find_config, load_config
from kata.config.model import (
    AgentConfig,
    ConfigError,
    FactoryConfig,
    HypervisorConfig,
    RuntimeConfig,
    RuntimeSection,
)

__all__ = [
    "AgentConfig",
    "ConfigError",
    "FactoryConfig",
    "HypervisorConfig",
    "RuntimeConfig",
    "RuntimeSection",
    "apply_annotations",
    "dump_config",
    "find_config",
    "load_config",
]
