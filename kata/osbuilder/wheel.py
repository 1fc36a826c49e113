"""Python wheels for the guest, fetched with pip for the guest's interpreter and unpacked as plain files."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kata.osbuilder.cache import sha256_file


class WheelError(RuntimeError):
    """A one-line reason why a wheel could not be fetched or installed."""


@dataclass(frozen=True)
class WheelSpec:
    requirement: str  # "name==version": pinned, so the guest runs what the host's generated code expects
    python_version: str = "3.11"
    platform: str = "manylinux2014_x86_64"
    implementation: str = "cp"

    @property
    def name(self) -> str:
        return self.requirement.split("==")[0]

    def glob(self) -> str:
        name, _, version = self.requirement.partition("==")
        return f"{name.replace('-', '_')}-{version}-*.whl"


def fetch(spec: WheelSpec, wheel_dir: Path) -> Path:
    """The cached wheel file, downloaded with pip on first use (binary only: no build in the guest)."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    have = sorted(wheel_dir.glob(spec.glob()))
    if have:
        return have[0]
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
        "--no-deps", "--only-binary=:all:",
        "--python-version", spec.python_version, "--platform", spec.platform,
        "--implementation", spec.implementation,
        "--dest", str(wheel_dir), spec.requirement,
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    have = sorted(wheel_dir.glob(spec.glob()))
    if res.returncode != 0 or not have:
        err = (res.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise WheelError(f"pip download {spec.requirement} failed: {err}")
    return have[0]


def wheel_digest(path: Path) -> str:
    return sha256_file(path)


def unpack(wheel: Path, site_dir: Path) -> list[str]:
    """Unzip into site_dir (a wheel's purelib/platlib layout is the site layout); returns member names."""
    site_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(zf.namelist())
        for name in names:
            if ".." in Path(name).parts or name.startswith("/"):
                raise WheelError(f"{wheel.name}: unsafe member path {name}")
        zf.extractall(site_dir)
    return names
