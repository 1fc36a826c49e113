"""Content hashes for build inputs: the name of every cached artefact is derived from what went into it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

DIGEST_LEN = 16


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class InputsHash:
    """An order-sensitive hash of labelled parts; labels keep ("ab","c") and ("a","bc") apart."""

    def __init__(self, kind: str) -> None:
        self._h = hashlib.sha256(kind.encode() + b"\0")

    def add(self, label: str, data: bytes | str) -> InputsHash:
        raw = data.encode() if isinstance(data, str) else data
        self._h.update(f"{label}\0{len(raw)}\0".encode())
        self._h.update(raw)
        return self

    def add_files(self, label: str, files: Iterable[tuple[str, Path]]) -> InputsHash:
        """Hash (name, file) pairs in name order, so directory walk order never matters."""
        for name, path in sorted(files, key=lambda item: item[0]):
            self.add(f"{label}:{name}", path.read_bytes())
        return self

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:DIGEST_LEN]
