"""Generate the Python protobuf modules from the .proto files of this package.

Run at install time (``python -m kata.protocols.build``): the generated ``*_pb2.py`` files are
not committed, so they always match the protobuf runtime pinned in pyproject.toml.
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# Protos import each other as "kata/protocols/...", so the root is the directory above "kata".
PROTO_ROOT = PACKAGE_DIR.parent.parent


def proto_files() -> list[Path]:
    return sorted(PACKAGE_DIR.rglob("*.proto"))


def generate() -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc  # build-time only dependency

    from kata.protocols import containerd_protos

    containerd_protos.stage()
    wkt_include = Path(grpc_tools.__file__).parent / "_proto"
    files = proto_files()
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{wkt_include}",
        f"--python_out={PROTO_ROOT}",
        f"--pyi_out={PROTO_ROOT}",
        *[str(f.relative_to(PROTO_ROOT)) for f in files],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed for " + ", ".join(str(f) for f in files))
    for f in files:
        # Every directory down to the file is a package (setuptools only finds those).
        for d in f.relative_to(PACKAGE_DIR).parents:
            (PACKAGE_DIR / d / "__init__.py").touch(exist_ok=True)
    return files


def main() -> int:
    try:
        files = generate()
    except Exception as exc:  # one line for the installer, not a traceback
        print(f"kata.protocols.build: {exc}", file=sys.stderr)
        return 1
    print(f"generated Python code for {len(files)} .proto files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
