"""`kata-runtime env`: the resolved configuration and where it came from, as TOML (default) or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kata import __version__


def add_parser(sub: Any) -> None:
    p = sub.add_parser("env", help="show the resolved configuration")
    p.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    p.set_defaults(func=run)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def _toml(table: dict[str, Any], prefix: str = "") -> list[str]:
    lines = [f"{k} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for k, v in table.items():
        if isinstance(v, dict):
            name = f"{prefix}.{k}" if prefix else k
            sub = _toml(v, name)
            if any(not isinstance(x, dict) for x in v.values()):
                lines += ["", f"[{name}]"]
            lines += sub
    return lines


def run(args: argparse.Namespace) -> int:
    from kata.config import dump_config, load_config

    cfg = load_config(Path(args.config) if args.config else None)
    data = dump_config(cfg)
    data["meta"]["version"] = __version__
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        print()
    else:
        print("\n".join(_toml(data)).lstrip("\n"))
    return 0
