"""Choose QEMU's accelerator: KVM only when a guest really runs under it, else TCG.

An openable /dev/kvm, or a KVM_CREATE_VM that succeeds, proves nothing: on a KVM PVM host a stock
guest kernel hangs at once. So the decisive test boots the configured guest kernel under KVM for a
few seconds and looks for its console output. The answer is cached per (kernel, QEMU, host kernel),
so only the first run pays.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .host import HostCapabilities, cpu_flags, host_capabilities, kvm_module, kvm_open_error

log = logging.getLogger(__name__)

Accel = Literal["kvm", "tcg"]
DEFAULT_CACHE_FILE = Path("/var/cache/kata-containers/accel.json")
PROBE_TIMEOUT = 5.0
# Printed by every Linux kernel once its console is up: the guest executes under KVM.
_ALIVE_MARKERS = (b"Linux version", b"Kernel panic", b"Run /")

__all__ = ["ProbeResult", "choose_accel", "boot_probe", "host_capabilities", "HostCapabilities"]

Probe = Callable[[Path, Path], tuple[Accel, str]]


@dataclass(frozen=True)
class ProbeResult:
    accel: Accel
    reason: str
    cached: bool


def boot_probe(qemu_path: Path, kernel: Path, timeout: float = PROBE_TIMEOUT) -> tuple[Accel, str]:
    """Boot ``kernel`` under KVM until it prints; no root device, so it panics and QEMU exits."""
    unusable = kvm_open_error()
    if unusable is not None:
        return "tcg", f"/dev/kvm unusable ({unusable})"
    argv = [
        str(qemu_path), "-machine", "microvm,x-option-roms=off,isa-serial=on,rtc=on",
        "-accel", "kvm", "-cpu", "host", "-m", "128M", "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
        "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 init=/kata-accel-probe-absent",
    ]  # fmt: skip
    virt = "vmx/svm" if cpu_flags() & {"vmx", "svm"} else "no vmx/svm"
    context = f"(cpu {virt}, kvm module {kvm_module()})"
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        seen = b""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    break
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                seen = (seen + chunk)[-4096:]
                if any(m in seen for m in _ALIVE_MARKERS):
                    return "kvm", f"a guest kernel ran under KVM {context}"
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        err.seek(0)
        lines = [ln.strip() for ln in err.read().decode(errors="replace").splitlines() if ln.strip()]
    if lines:
        return "tcg", f"QEMU could not run a KVM guest: {lines[-1]} {context}"
    return "tcg", f"the guest kernel printed nothing within {timeout:g}s under KVM {context}"


def _cache_key(qemu_path: Path, kernel: Path) -> str:
    def ident(p: Path) -> str:
        st = p.stat()
        return f"{p.resolve()}:{st.st_mtime_ns}:{st.st_size}"

    # The QEMU binary's mtime and size stand for its version without running it on every start.
    return "|".join([ident(kernel), ident(qemu_path), os.uname().release, str(Path("/dev/kvm").exists())])


def _read_cache(cache_file: Path) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(cache_file.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache_file: Path, key: str, accel: Accel, reason: str) -> None:
    entries = _read_cache(cache_file)
    entries[key] = {"accel": accel, "reason": reason}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, cache_file)
    except OSError as exc:
        log.warning("cannot cache the accelerator choice in %s: %s", cache_file, exc.strerror)


def choose_accel(
    qemu_path: Path,
    kernel: Path,
    cache_file: Path = DEFAULT_CACHE_FILE,
    force: Literal["auto", "kvm", "tcg"] = "auto",
    probe: Probe = boot_probe,
) -> ProbeResult:
    if force != "auto":
        return ProbeResult(force, "set in the configuration", cached=False)
    if not Path("/dev/kvm").exists():
        return ProbeResult("tcg", "no /dev/kvm", cached=False)
    try:
        key = _cache_key(qemu_path, kernel)
    except OSError as exc:
        # Without the kernel or QEMU there is nothing to probe; the VM start will report it.
        return ProbeResult("tcg", f"cannot probe KVM: {exc.filename}: {exc.strerror}", cached=False)
    hit = _read_cache(cache_file).get(key)
    if hit is not None and hit.get("accel") in ("kvm", "tcg"):
        accel: Accel = "kvm" if hit["accel"] == "kvm" else "tcg"
        return ProbeResult(accel, str(hit.get("reason", "")), cached=True)
    accel, reason = probe(qemu_path, kernel)
    if accel == "tcg":
        log.warning("KVM is not usable, falling back to TCG (slow software emulation): %s", reason)
    _write_cache(cache_file, key, accel, reason)
    return ProbeResult(accel, reason, cached=False)
