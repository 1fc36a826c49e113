"""`kata-runtime features`: what this runtime supports, in the JSON of `runc features` (runc 1.1
introduced the verb); the document is kata.oci.features'."""

from __future__ import annotations

import argparse
import json
from typing import Any

from kata.oci.features import features


def add_parser(sub: Any) -> None:
    p = sub.add_parser("features", help="show the enabled features")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # runc: json.Encoder with a four-space indent, which ends the document with a newline.
    print(json.dumps(features(), indent=4))
    return 0
