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


def run(args: argparse.Namespace) -> int:
    from kata.config import dump_config, load_config
    from kata.config.toml_out import dumps

    cfg = load_config(Path(args.config) if args.config else None)
    data = dump_config(cfg)
    data["meta"]["version"] = __version__
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        print()
    else:
        print(dumps(data), end="")
    return 0
