"""Build the guest kernel: Debian's linux-source 6.1, tinyconfig + our fragment, everything built in.

The output is the ELF `vmlinux`, which QEMU boots directly through PVH (no decompression stage), named by a
hash of everything that determines it so a rebuild only happens when an input changes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections import deque
from collections.abc import Callable
from pathlib import Path

from kata.osbuilder.cache import DIGEST_LEN

FRAGMENT_PATH = Path(__file__).with_name("kernel-fragment.config")
# Our few changes to Debian's source, applied in name order (`patch -p1`).
PATCH_DIR = Path(__file__).with_name("kernel-patches")
SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")

# Kbuild's short progress lines ("  CC      kernel/fork.o"); everything else is noise for a progress view.
_PROGRESS_RE = re.compile(r"^\s{2}[A-Z0-9_\[\]]+\s+\S")
_OPTION_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")


class KernelBuildError(RuntimeError):
    """A one-line reason why the guest kernel could not be built."""


def source_version() -> str:
    """The installed linux-source package version: a new Debian upload means a new kernel."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise KernelBuildError(f"{SOURCE_PACKAGE} is not installed (dpkg-query: {exc})") from exc
    return out.stdout.strip()


# Bump when the build steps below change what comes out (not for edits that leave the kernel alike):
# the hash names the cached vmlinux, and a new hash costs a ~10 minute rebuild.
KERNEL_RECIPE = "tinyconfig+fragment+olddefconfig/vmlinux/1"


def kernel_patches() -> list[Path]:
    return sorted(PATCH_DIR.glob("*.patch"))


def kernel_inputs_hash() -> str:
    h = hashlib.sha256()
    h.update(FRAGMENT_PATH.read_bytes())
    for patch in kernel_patches():
        h.update(b"\0" + patch.name.encode() + b"\0" + patch.read_bytes())
    h.update(b"\0" + source_version().encode() + b"\0")
    h.update(KERNEL_RECIPE.encode())
    return h.hexdigest()[:DIGEST_LEN]


def missing_options(fragment_text: str, config_text: str) -> list[str]:
    """Assignments in the fragment that the final .config does not carry with the same value.

    olddefconfig drops options whose dependencies are off without a word, so this is the only way to
    notice that a wanted driver is not in the kernel.
    """
    have: dict[str, str] = {}
    for line in config_text.splitlines():
        m = _OPTION_RE.match(line.strip())
        if m:
            have[m.group(1)] = m.group(2)
    missing = []
    for line in fragment_text.splitlines():
        m = _OPTION_RE.match(line.strip())
        if m and m.group(2) != "n" and have.get(m.group(1)) != m.group(2):
            missing.append(f"{m.group(1)}={m.group(2)}")
    return missing


def _run(cmd: list[str], cwd: Path, log_file: Path, log: Callable[[str], None], what: str) -> None:
    """Run a build step, forward progress lines, keep the full output in log_file."""
    tail: deque[str] = deque(maxlen=20)
    with log_file.open("a") as lf:
        lf.write(f"$ {' '.join(cmd)}\n")
        lf.flush()
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                lf.write(line)
                line = line.rstrip("\n")
                tail.append(line)
                if _PROGRESS_RE.match(line):
                    log(line.strip())
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if rc != 0:
        errors = [t for t in tail if "error" in t.lower()] or list(tail)[-1:] or ["no output"]
        raise KernelBuildError(f"{what} failed (exit {rc}): {errors[-1].strip()} (full log: {log_file})")


def apply_patches(tree: Path, patches: list[Path], log: Callable[[str], None]) -> None:
    for patch in patches:
        log(f"applying {patch.name}")
        # Exactly or not at all: a new Debian source that moved the context fails here, loudly.
        cmd = ["patch", "-p1", "--forward", "--batch", "--quiet", "--fuzz=0", "--no-backup-if-mismatch",
               "-i", str(patch)]
        try:
            res = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
        except OSError as exc:
            raise KernelBuildError(f"cannot run patch for {patch.name}: {exc.strerror}") from exc
        if res.returncode != 0:
            why = (res.stdout + res.stderr).strip().splitlines() or ["no output"]
            raise KernelBuildError(f"kernel patch {patch.name} does not apply: {why[-1]}")


def _extract(src_dir: Path, log: Callable[[str], None]) -> None:
    if (src_dir / "Makefile").exists():
        return
    if not SOURCE_TARBALL.exists():
        raise KernelBuildError(f"{SOURCE_TARBALL} is missing: apt-get install {SOURCE_PACKAGE}")
    tmp = src_dir.with_name(src_dir.name + ".extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"extracting {SOURCE_TARBALL}")
    res = subprocess.run(
        ["tar", "-xf", str(SOURCE_TARBALL), "-C", str(tmp), "--strip-components=1"],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KernelBuildError(f"extracting {SOURCE_TARBALL} failed: {res.stderr.strip()[-200:]}")
    try:
        apply_patches(tmp, kernel_patches(), log)
    except KernelBuildError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Rename last so a half-extracted tree is never mistaken for a complete one.
    shutil.rmtree(src_dir, ignore_errors=True)
    tmp.rename(src_dir)


def configure(src_dir: Path, log: Callable[[str], None] = print) -> None:
    """tinyconfig + fragment + olddefconfig, then insist the fragment survived."""
    log_file = src_dir / "build.log"
    _run(["make", "tinyconfig"], src_dir, log_file, log, "make tinyconfig")
    _run(
        ["scripts/kconfig/merge_config.sh", "-m", ".config", str(FRAGMENT_PATH)],
        src_dir,
        log_file,
        log,
        "merge_config.sh",
    )
    _run(["make", "olddefconfig"], src_dir, log_file, log, "make olddefconfig")
    missing = missing_options(FRAGMENT_PATH.read_text(), (src_dir / ".config").read_text())
    if missing:
        raise KernelBuildError(
            f"kernel config lost {len(missing)} fragment option(s) (unmet dependencies?): {' '.join(missing)}"
        )


def build_kernel(
    out_dir: Path, work_dir: Path, jobs: int | None = None, log: Callable[[str], None] = print
) -> Path:
    digest = kernel_inputs_hash()
    target = out_dir / f"vmlinux-{digest}"
    if target.exists():
        return target
    src_dir = work_dir / f"linux-{digest}"
    work_dir.mkdir(parents=True, exist_ok=True)
    _extract(src_dir, log)
    configure(src_dir, log)
    n = jobs or os.cpu_count() or 1
    log(f"building vmlinux with -j{n}")
    _run(["make", f"-j{n}", "vmlinux"], src_dir, src_dir / "build.log", log, "make vmlinux")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".vmlinux-{digest}.tmp.{os.getpid()}"
    try:
        shutil.copyfile(src_dir / "vmlinux", tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"kernel ready: {target}")
    return target
