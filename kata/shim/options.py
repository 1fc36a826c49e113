"""The runtime options containerd hands the shim (on `start`'s stdin, and in Create): a protobuf Any
that, for a CRI runtime handler, holds runtimeoptions.v1.Options, whose config_path picks the
configuration.toml. Decoded with kata.ttrpc.wire: `start` loads no protobuf runtime."""

from __future__ import annotations

from pathlib import Path

from kata.ttrpc import wire

_TYPE = "runtimeoptions.v1.Options"


def config_path(type_url: str, value: bytes) -> Path | None:
    """Options.config_path (field 2), when the Any holds runtimeoptions.v1.Options and names one."""
    if not type_url.endswith(_TYPE):
        return None
    path = wire.last_str(wire.decode(value), 2)
    return Path(path) if path else None


def config_path_of_any(data: bytes) -> Path | None:
    """The same, from a serialized Any (type_url 1, value 2); raises ValueError when malformed."""
    fields = wire.decode(data)
    return config_path(wire.last_str(fields, 1), wire.last_bytes(fields, 2))
