"""Write the configuration back as TOML (tomllib only reads): for `kata-runtime env` and tests."""

from __future__ import annotations

import json
import re
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key(k: str) -> str:
    """A bare key as is; any other (containerd's plugin names have dots) quoted."""
    return k if _BARE_KEY.fullmatch(k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def _tables(table: dict[str, Any], prefix: str = "") -> list[str]:
    lines = [f"{_key(k)} = {_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for k, v in table.items():
        if isinstance(v, dict):
            name = f"{prefix}.{_key(k)}" if prefix else _key(k)
            sub = _tables(v, name)
            if any(not isinstance(x, dict) for x in v.values()):
                lines += ["", f"[{name}]"]
            lines += sub
    return lines


def dumps(data: dict[str, Any]) -> str:
    """Nested dicts become [a.b] tables; scalars and lists of scalars become key = value lines."""
    return "\n".join(_tables(data)).lstrip("\n") + "\n"
