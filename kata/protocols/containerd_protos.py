"""Stage containerd's own .proto files (from Debian's golang-github-containerd-*-dev packages) into
this package, so that protoc generates importable Python modules for them.

Go import paths ("github.com/containerd/containerd/...") are not Python module names, and the
gogoproto options only steer Go code generation: the staged copies import each other under
"kata/protocols/..." and carry no gogoproto or fieldpath options. Package names, messages and field
numbers are untouched: they are the wire format and the names in ttrpc calls and protobuf Any URLs.
"""

from __future__ import annotations

import re
from pathlib import Path

GOCODE = Path("/usr/share/gocode/src")
PACKAGE_DIR = Path(__file__).resolve().parent

# Go import prefix -> where the staged copy goes under this package.
_PREFIXES = {
    "github.com/containerd/containerd/": "containerd/",
    "github.com/containerd/cgroups/": "cgroups/",
}
# What the shim needs: the task API and its types, events and their forwarding service, the CRI
# plugin's runtime options, and the cgroup metrics that task stats are reported in.
SOURCES = (
    "github.com/containerd/containerd/runtime/v2/task/shim.proto",
    "github.com/containerd/containerd/api/types/mount.proto",
    "github.com/containerd/containerd/api/types/task/task.proto",
    "github.com/containerd/containerd/api/events/task.proto",
    "github.com/containerd/containerd/api/services/ttrpc/events/v1/events.proto",
    "github.com/containerd/containerd/pkg/runtimeoptions/v1/api.proto",
    "github.com/containerd/cgroups/stats/v1/metrics.proto",
)
# The Debian packages that ship SOURCES (scripts/install.sh installs them).
DEBIAN_PACKAGES = ("golang-github-containerd-containerd-dev", "golang-github-containerd-cgroups-dev")

_GO_ONLY_IMPORT = re.compile(r'^\s*import\s+(weak\s+)?"[^"]*(gogoproto/gogo|plugin/fieldpath)\.proto";\s*$',
                             re.MULTILINE)
_GO_ONLY_OPTION = re.compile(r"^\s*option\s+\((gogoproto|containerd\.plugin)\.[^;]*;\s*$", re.MULTILINE)
_GO_ONLY_FIELD_OPTIONS = re.compile(r"\s*\[\s*\((gogoproto|containerd\.plugin)\.[^\]]*\]", re.DOTALL)


def staged_path(source: str) -> str:
    """The path of a Go-import-path .proto once staged, relative to the directory above "kata"."""
    for prefix, target in _PREFIXES.items():
        if source.startswith(prefix):
            return "kata/protocols/" + target + source[len(prefix):]
    return source  # google/protobuf/* and other well-known types stay where protoc finds them


def rewrite(text: str) -> str:
    """A containerd .proto without its Go-only options, importing the other staged copies."""
    text = _GO_ONLY_IMPORT.sub("", text)
    text = _GO_ONLY_OPTION.sub("", text)
    text = _GO_ONLY_FIELD_OPTIONS.sub("", text)
    return re.sub(r'import\s+"([^"]+)"', lambda m: f'import "{staged_path(m.group(1))}"', text)


def stage(gocode: Path = GOCODE) -> list[Path]:
    """Write the rewritten copies of SOURCES under this package; returns their paths."""
    missing = [s for s in SOURCES if not (gocode / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{gocode / missing[0]} is missing: install {' and '.join(DEBIAN_PACKAGES)}")
    written = []
    root = PACKAGE_DIR.parent.parent
    for source in SOURCES:
        target = root / staged_path(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = rewrite((gocode / source).read_text())
        if not target.exists() or target.read_text() != text:  # keep mtimes: staleness checks use them
            target.write_text(text)
        written.append(target)
    return written
