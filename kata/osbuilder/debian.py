"""Debian packages for the guest: resolve Depends/Pre-Depends with apt's metadata, download, unpack.

No dpkg database and no maintainer scripts: the guest root is read-only and never runs apt, so whatever a
postinst would create is made explicitly by the rootfs assembly.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from kata.osbuilder.cache import sha256_file

ARCHITECTURES = ("amd64", "all")
_VERSION_OR_ARCH = re.compile(r"\s*(\(.*?\)|\[.*?\]|<.*?>)\s*")


class PackageError(RuntimeError):
    """A one-line reason why the package set could not be resolved or fetched."""


@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str
    architecture: str
    # Each entry is a list of alternatives ("a | b"), already stripped of version constraints.
    depends: tuple[tuple[str, ...], ...]
    filename: str
    sha256: str

    @property
    def deb_name(self) -> str:
        """The file name apt-get download writes (the epoch colon is URL-quoted, unlike the pool name)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"


def parse_stanzas(text: str) -> list[dict[str, str]]:
    """Split deb822 control text into field dicts; continuation lines are joined to their field."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = ""
    for line in text.splitlines():
        if not line.strip():
            if current:
                stanzas.append(current)
            current, last = {}, ""
        elif line[0] in " \t" and last:
            current[last] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            last = key.strip()
            current[last] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def parse_relations(field: str) -> tuple[tuple[str, ...], ...]:
    """'a (>= 1), b:any | c [amd64]' -> (('a',), ('b', 'c')): names only, versions and qualifiers dropped."""
    groups: list[tuple[str, ...]] = []
    for group in field.split(","):
        names = []
        for alt in group.split("|"):
            name = _VERSION_OR_ARCH.sub(" ", alt).strip().split(":")[0]
            if name:
                names.append(name)
        if names:
            groups.append(tuple(names))
    return tuple(groups)


def package_from_stanza(stanza: dict[str, str]) -> DebPackage:
    relations = ", ".join(f for f in (stanza.get("Pre-Depends", ""), stanza.get("Depends", "")) if f)
    return DebPackage(
        name=stanza["Package"],
        version=stanza["Version"],
        architecture=stanza.get("Architecture", ""),
        depends=parse_relations(relations),
        filename=stanza.get("Filename", ""),
        sha256=stanza.get("SHA256", ""),
    )


Query = Callable[[list[str]], dict[str, DebPackage]]


def apt_cache_show(names: list[str]) -> dict[str, DebPackage]:
    """The candidate version of each name that is a real package; virtual or unknown names are absent."""
    if not names:
        return {}
    # apt-cache exits non-zero when any name is purely virtual but still prints the others.
    res = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", *names], capture_output=True, text=True, check=False
    )
    found: dict[str, DebPackage] = {}
    for stanza in parse_stanzas(res.stdout):
        if "Package" in stanza and stanza.get("Architecture") in ARCHITECTURES:
            found.setdefault(stanza["Package"], package_from_stanza(stanza))
    return found


def apt_closure_names(roots: list[str]) -> list[str]:
    """Every name reachable from roots over hard dependencies, alternatives included (one apt call)."""
    res = subprocess.run(
        [
            "apt-cache",
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            *roots,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    names = set(roots)
    for line in res.stdout.splitlines():
        name = line.split(":", 1)[1] if ":" in line and line.startswith(" ") else line
        name = name.strip().strip("<>").split(":")[0]
        if name:
            names.add(name)
    return sorted(names)


class AptQuery:
    """apt-cache starts in about a second here (no pkgcache.bin), so fetch the whole closure in two calls
    up front and answer the resolver from memory."""

    def __init__(self) -> None:
        self._cache: dict[str, DebPackage] = {}
        self._asked: set[str] = set()

    def __call__(self, names: list[str]) -> dict[str, DebPackage]:
        todo = [n for n in names if n not in self._asked]
        if todo:
            wanted = apt_closure_names(todo)
            self._cache.update(apt_cache_show([n for n in wanted if n not in self._asked]))
            self._asked.update(wanted)
        return {n: self._cache[n] for n in names if n in self._cache}


def resolve(roots: Iterable[str], exclude: Iterable[str], query: Query | None = None) -> list[DebPackage]:
    """The closure of roots over Depends/Pre-Depends (never Recommends), sorted by name.

    An alternative group is satisfied by an already chosen member, else by its first real package.
    Excluded names are treated as satisfied: the rootfs deletes whatever in the guest would need them.
    """
    query = query or AptQuery()
    skip = set(exclude)
    chosen: dict[str, DebPackage] = {}
    known: dict[str, DebPackage | None] = {}

    def lookup(names: list[str]) -> None:
        todo = [n for n in names if n not in known]
        if todo:
            got = query(todo)
            for n in todo:
                known[n] = got.get(n)

    pending = [r for r in roots if r not in skip]
    lookup(pending)
    for r in pending:
        if known[r] is None:
            raise PackageError(f"package {r!r} not found by apt (run apt-get update?)")
    while pending:
        batch, pending = pending, []
        for name in batch:
            pkg = known[name]
            if name in chosen or pkg is None:
                continue
            chosen[name] = pkg
            lookup([n for group in pkg.depends for n in group])
            for group in pkg.depends:
                if any(n in chosen or n in skip for n in group) or any(n in pending for n in group):
                    continue
                real = next((n for n in group if known.get(n) is not None), None)
                if real is None:
                    raise PackageError(f"{name}: cannot satisfy dependency {' | '.join(group)}")
                pending.append(real)
    return sorted(chosen.values(), key=lambda p: p.name)


def download(packages: list[DebPackage], deb_dir: Path, log: Callable[[str], None]) -> list[Path]:
    """Fetch the exact resolved versions into deb_dir (a cache), checking each file's SHA256."""
    deb_dir.mkdir(parents=True, exist_ok=True)

    def valid(p: DebPackage) -> bool:
        f = deb_dir / p.deb_name
        return f.exists() and (not p.sha256 or sha256_file(f) == p.sha256)

    missing = [p for p in packages if not valid(p)]
    if missing:
        log(f"downloading {len(missing)} of {len(packages)} packages")
        res = subprocess.run(
            ["apt-get", "download", "-q", *[f"{p.name}={p.version}" for p in missing]],
            cwd=deb_dir,
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            err = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise PackageError(f"apt-get download failed: {err}")
        bad = [p.name for p in missing if not valid(p)]
        if bad:
            raise PackageError(f"downloaded package(s) missing or with wrong SHA256: {' '.join(bad)}")
    return [deb_dir / p.deb_name for p in packages]


def extract(debs: list[Path], root: Path) -> None:
    """Unpack data.tar of every .deb into root (no control files, no scripts)."""
    root.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        res = subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], capture_output=True, text=True)
        if res.returncode != 0:
            raise PackageError(f"dpkg-deb -x {deb.name} failed: {res.stderr.strip()[-200:]}")


def require_tools() -> None:
    for tool in ("apt-cache", "apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise PackageError(f"{tool} not found: the rootfs is built from Debian packages with apt")
