"""Facts about the host's virtualisation support, for `kata-runtime check` and the accelerator probe."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DEFAULT_QEMU = Path("/usr/bin/qemu-system-x86_64")
KVM_DEVICE = Path("/dev/kvm")
# Present only in a kernel built with seccomp filters, which QEMU's -sandbox installs.
SECCOMP_FILTER_SYSCTL = Path("/proc/sys/kernel/seccomp/actions_avail")
VIRTIOFSD_CANDIDATES = (
    Path("/usr/libexec/virtiofsd"),
    Path("/usr/lib/qemu/virtiofsd"),
    Path("/usr/bin/virtiofsd"),
)


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def tcg_kernel_params(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """Extra parameters for a guest under TCG: tell it the TSC rate instead of letting it calibrate.

    Under TCG the guest TSC is the host's, but PIT calibration often fails when the host is busy; the
    kernel then marks the TSC unstable and hangs before /init (measured: 1 boot in 4 under load, 0 of 10
    with this). With KVM the rate comes from the hypervisor and this is not needed.
    """
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "cpu MHz":
                return (f"tsc_early_khz={round(float(value) * 1000)}",)
    except (OSError, ValueError):
        pass
    return ()


def kvm_module() -> str:
    """Which KVM flavour the host kernel has (loaded or built in): "pvm", "intel", "amd" or "none"."""
    for name in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if Path("/sys/module", name).exists():
            return name.removeprefix("kvm_")
    return "none"


def find_virtiofsd() -> Path | None:
    for path in VIRTIOFSD_CANDIDATES:
        if path.is_file():
            return path
    found = shutil.which("virtiofsd")
    return Path(found) if found else None


def _run_qemu(qemu_path: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run([str(qemu_path), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None


def qemu_version(qemu_path: Path) -> str | None:
    out = _run_qemu(qemu_path, "-version")
    first = out.stdout.splitlines()[0] if out is not None and out.stdout else ""
    # "QEMU emulator version 7.2.22 (Debian …)"
    parts = first.split("version", 1)
    return parts[1].split()[0] if len(parts) == 2 and parts[1].split() else None


def qemu_seccomp(qemu_path: Path) -> bool | None:
    """Whether this QEMU takes ``-sandbox on`` (it was built with libseccomp); None if it does not run.

    QEMU reads its options in order, so ``-version`` after ``-sandbox`` exits before any VM exists."""
    out = _run_qemu(qemu_path, "-sandbox", "on", "-version")
    return None if out is None else out.returncode == 0


def kernel_seccomp() -> bool:
    return SECCOMP_FILTER_SYSCTL.exists()


def kvm_open_error(device: Path = KVM_DEVICE) -> str | None:
    """Why ``device`` cannot be opened read-write, as QEMU's -accel kvm opens it; None when it can.

    An open that succeeds says nothing about whether a guest runs (see accel.py)."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    return None


@dataclass(frozen=True)
class HostCapabilities:
    cpu_vmx: bool
    cpu_svm: bool
    dev_kvm: bool
    kvm_module: str  # "pvm" means only PVM-built guests run under KVM
    dev_vhost_vsock: bool
    dev_vhost_net: bool
    qemu_path: Path
    qemu_version: str | None
    virtiofsd: Path | None

    @property
    def hardware_virt(self) -> bool:
        """VT-x/AMD-V with a matching KVM module: stock guests can use KVM."""
        return (self.cpu_vmx or self.cpu_svm) and self.dev_kvm and self.kvm_module in ("intel", "amd")


def host_capabilities(qemu_path: Path = DEFAULT_QEMU) -> HostCapabilities:
    flags = cpu_flags()
    return HostCapabilities(
        cpu_vmx="vmx" in flags,
        cpu_svm="svm" in flags,
        dev_kvm=KVM_DEVICE.exists(),
        kvm_module=kvm_module(),
        dev_vhost_vsock=Path("/dev/vhost-vsock").exists(),
        dev_vhost_net=Path("/dev/vhost-net").exists(),
        qemu_path=qemu_path,
        qemu_version=qemu_version(qemu_path),
        virtiofsd=find_virtiofsd(),
    )
