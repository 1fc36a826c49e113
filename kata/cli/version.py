"""`kata-runtime version`."""

from __future__ import annotations

import argparse
from typing import Any

from kata import __version__
from kata.oci.features import OCI_SPEC_VERSION


def add_parser(sub: Any) -> None:
    p = sub.add_parser("version", help="print the runtime version")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(f"kata-runtime  : {__version__}")
    print(f"   OCI specs  : {OCI_SPEC_VERSION}")
    return 0
