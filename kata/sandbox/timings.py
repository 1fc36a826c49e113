"""Named phase marks of one runtime command, logged as a single line for bench/ to read."""

from __future__ import annotations

import json
import time


class Timings:
    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = round(time.monotonic() - self._t0, 4)

    def as_json(self) -> str:
        return json.dumps(self.marks, sort_keys=False)
