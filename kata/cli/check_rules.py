"""`kata-runtime check`'s verdicts: each host fact judged against the configuration, with no I/O.

Every check says what it looked at, what it found, why that matters to this runtime and, when it is
not ok, what to do. "warning" is a host that works, but slower or less confined than it could;
"problem" is one where sandboxes cannot start, and makes `check` exit non-zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from kata.cli.check_facts import HostFacts
from kata.config import RuntimeConfig
from kata.sandbox.vm import agent_channel

Status = Literal["ok", "warning", "problem"]
OSBUILDER = "run `kata-osbuilder build`"
TCG = "VMs run under TCG"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    found: str  # what it found, one short line
    looked_at: str  # the file, device, module or command it read
    why: str  # why it matters to this runtime
    todo: str = ""  # what to do; only when not ok

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def problem_line(self) -> str:
        """The plain output's one line for a problem."""
        return f"{self.found}: {self.todo}"


def _section(cfg: RuntimeConfig) -> str:
    return f"[hypervisor.{cfg.hypervisor.name}]"


def configuration(facts: HostFacts, cfg: RuntimeConfig) -> Check:
    looked = "--config, KATA_CONF_FILE, /etc, /usr/share/defaults"
    return Check("configuration", "ok", str(cfg.source), looked,
                 "every setting judged below comes from the first of these that is set or exists")


def cpu_virtualisation(facts: HostFacts, cfg: RuntimeConfig) -> Check:
    looked, why = "/proc/cpuinfo flags", "KVM runs a stock guest kernel only with VT-x (vmx) or AMD-V (svm)"
    flag = "vmx" if facts.caps.cpu_vmx else "svm" if facts.caps.cpu_svm else ""
    if flag:
        return Check("cpu-virtualisation", "ok", flag, looked, why)
    return Check("cpu-virtualisation", "warning", f"no vmx or svm: {TCG}", looked, why,
                 "enable VT-x/AMD-V in the firmware (or nested virtualisation in the host's hypervisor)")


def kvm_module(facts: HostFacts, cfg: RuntimeConfig) -> Check:
    looked = "/sys/module/kvm_intel, kvm_amd, kvm_pvm"
    why = "kvm_intel or kvm_amd runs any guest; kvm_pvm runs only kernels built for PVM"
    module = facts.caps.kvm_module
    if module in ("intel", "amd"):
        return Check("kvm-module", "ok", f"kvm_{module}", looked, why)
    found = f"kvm_pvm: our guest kernel hangs under it, {TCG}" if module == "pvm" else f"none: {TCG}"
    return Check("kvm-module", "warning", found, looked, why, "modprobe kvm_intel or kvm_amd (per the CPU)")


def kvm(facts: HostFacts, cfg: RuntimeConfig) -> Check:
    """/dev/kvm and the accelerator it leads to: opening it proves little, a guest that runs does."""
    forced = cfg.hypervisor.accel
    probe = facts.accel if forced == "auto" else None  # a forced choice is only echoed back, not probed
    looked = "/dev/kvm (opened read-write)"
    if probe is not None:
        looked += "; a guest kernel booted under it" + (" (cached)" if probe.cached else "")
    why = "KVM runs guest code natively; TCG emulates it, 7-10x slower, but containers still work"
    if forced == "tcg":
        return Check("kvm", "ok", 'not used: accel = "tcg" in the configuration', looked, why)
    if not facts.caps.dev_kvm:
        unusable = "absent"
    elif facts.kvm_open_error:
        unusable = f"cannot be opened ({facts.kvm_open_error})"
    elif probe is not None and probe.accel == "tcg":
        unusable = f"opens, but {probe.reason}"
    elif probe is None and not facts.caps.hardware_virt:
        unusable = "opens, but the host lacks vmx/svm or kvm_intel/amd"
    else:
        how = "a guest ran under it" if probe else "vmx/svm and kvm_intel/amd (not probed)"
        return Check("kvm", "ok", f"usable: {how}", looked, why)
    if forced == "kvm":
        return Check("kvm", "problem", f'accel = "kvm", but /dev/kvm {unusable}', looked, why,
                     'set accel = "auto" (or "tcg") in the configuration')
    todo = ("let this user read and write /dev/kvm" if facts.caps.dev_kvm and facts.kvm_open_error
            else "none needed; for speed, a host with VT-x/AMD-V and kvm_intel or kvm_amd")
    return Check("kvm", "warning", f"{unusable}: {TCG}", looked, why, todo)


def qemu(facts: HostFacts, cfg: RuntimeConfig) -> Check:
    path = cfg.hypervisor.path
    looked = f"{path} -version ({_section(cfg)} path)"
    why = "QEMU runs every VM; the runtime is tested with Debian's QEMU 7.2"
    if facts.caps.qemu_version:
        return Check("qemu", "ok", f"version {facts.caps.qemu_version}", looked, why)
    return Check("qemu", "problem", f"QEMU {path} is missing or does not run", looked, why,
                 "install qemu-system-x86, or set path")


def qemu_seccomp(facts: HostFacts, cfg: RuntimeConfig) -> Check:
    looked = f"{cfg.hypervisor.path} -sandbox on; /proc/sys/kernel/seccomp"
    why = "-sandbox confines QEMU: no fork, exec or privilege change, even if a guest subverts it"
    if not cfg.hypervisor.seccompsandbox:
        return Check("qemu-seccomp", "warning", 'off: seccompsandbox = ""', looked, why,
                     "set seccompsandbox as the packaged configuration does")
    if not facts.kernel_seccomp:
        return Check("qemu-seccomp", "problem", "the host kernel has no seccomp filters: QEMU will not start",
                     looked, why, 'use a kernel with CONFIG_SECCOMP_FILTER, or set seccompsandbox = ""')
    if facts.qemu_seccomp is None:
        return Check("qemu-seccomp", "warning", "not checked: QEMU does not run", looked, why, "see qemu")
    if not facts.qemu_seccomp:
        return Check("qemu-seccomp", "problem", "this QEMU has no -sandbox: QEMU will not start", looked, why,
                     'install a QEMU built with libseccomp (Debian\'s is), or set seccompsandbox = ""')
    return Check("qemu-seccomp", "ok", "QEMU and the kernel support it", looked, why)


def _asset(name: str, key: str, path: str, why: str, facts: HostFacts, cfg: RuntimeConfig) -> Check:
    looked = f"{path} ({_section(cfg)} {key})"
    if path in facts.present:
        return Check(name, "ok", "present", looked, why)
    return Check(name, "problem", f"{name.replace('-', ' ')} {path} is missing", looked, why, OSBUILDER)


def guest_kernel(facts: HostFacts, cfg: RuntimeConfig) -> Check:
    return _asset("guest-kernel", "kernel", cfg.hypervisor.kernel,
                  "every VM boots this kernel, templates included", facts, cfg)


def guest_image(facts: HostFacts, cfg: RuntimeConfig) -> Check:
    hv = cfg.hypervisor
    key, path = ("initrd", hv.initrd) if hv.initrd else ("image", hv.image)
    return _asset("guest-image", key, path, "the guest's root: the agent and crun", facts, cfg)


def virtiofsd(facts: HostFacts, cfg: RuntimeConfig) -> Check:
    hv = cfg.hypervisor
    looked = f"{hv.virtio_fs_daemon} ({_section(cfg)} virtio_fs_daemon)"
    why = "shares containers' rootfs and volumes with the VM; virtio-9p needs none but is slower"
    if hv.shared_fs != "virtio-fs":
        return Check("virtiofsd", "ok", f"not needed: shared_fs = {hv.shared_fs!r}", looked, why)
    if hv.virtio_fs_daemon in facts.present:
        return Check("virtiofsd", "ok", "present", looked, why)
    other = facts.caps.virtiofsd
    todo = f"set virtio_fs_daemon = {str(other)!r}" if other else "install qemu-system-common"
    return Check("virtiofsd", "problem", f"virtiofsd {hv.virtio_fs_daemon} is missing", looked, why,
                 f'{todo}, or set shared_fs = "virtio-9p"')


def vhost_net(facts: HostFacts, cfg: RuntimeConfig) -> Check:
    looked, why = "/dev/vhost-net", "with it the host kernel moves each NIC's packets; without it, QEMU does"
    if facts.caps.dev_vhost_net:
        return Check("vhost-net", "ok", "present: NICs use vhost", looked, why)
    return Check("vhost-net", "warning", "absent: networking works, but slower", looked, why,
                 "modprobe vhost_net")


def vhost_vsock(facts: HostFacts, cfg: RuntimeConfig) -> Check:
    looked = "/dev/vhost-vsock ([agent.kata] agent_channel)"
    why = "the agent channel when agent_channel = \"vsock\"; the default is virtio-serial"
    try:
        channel = agent_channel(cfg.agent.agent_channel, facts.caps.dev_vhost_vsock)
    except ValueError as exc:
        return Check("vhost-vsock", "problem", str(exc), looked, why,
                     'modprobe vhost_vsock, or set agent_channel = "virtio-serial"')
    if channel == "vsock":
        return Check("vhost-vsock", "ok", "present: the agent channel is vsock", looked, why)
    return Check("vhost-vsock", "ok", "not needed: the agent channel is virtio-serial", looked, why)


def templates(facts: HostFacts, cfg: RuntimeConfig) -> Check:
    t = facts.templates
    looked = f"{t.path} ([factory] template_path)"
    why = "sandboxes restore their VM shape's snapshot from here (with virtio-fs, its RAM too)"
    if not cfg.factory.enable_template:
        return Check("templates", "ok", "not used: enable_template = false, VMs boot cold", looked, why)
    if cfg.agent.agent_channel == "vsock":
        return Check("templates", "ok", "not used: vsock VMs boot cold", looked, why)
    if not t.writable:
        return Check("templates", "problem", f"template directory {t.path} is not writable", looked, why,
                     "make it writable, or set template_path or enable_template = false")
    if t.fs_type != "tmpfs":
        return Check("templates", "warning", f"on {t.fs_type or 'no mount'}, not tmpfs: snapshots go to disk",
                     looked, why, f"mount -t tmpfs tmpfs {t.path}, or set template_path into a tmpfs")
    return Check("templates", "ok", "tmpfs, writable", looked, why)


def cgroups(facts: HostFacts, cfg: RuntimeConfig) -> Check:
    looked = "/sys/fs/cgroup (and unified/)"
    why = "containers' limits apply in the guest's own cgroup v2, whatever the host's layout"
    if facts.cgroups == "none":
        return Check("cgroups", "warning", "no cgroup filesystem", looked, why,
                     "mount cgroup2 on /sys/fs/cgroup for containerd, Docker and the kubelet")
    names = {"v2": "v2 (unified)", "hybrid": "v1 with cgroup2 at unified/ (hybrid)", "v1": "v1"}
    return Check("cgroups", "ok", names[facts.cgroups], looked, why)


RULES: tuple[Callable[[HostFacts, RuntimeConfig], Check], ...] = (
    configuration, cpu_virtualisation, kvm_module, kvm, qemu, qemu_seccomp, guest_kernel, guest_image,
    virtiofsd, vhost_net, vhost_vsock, templates, cgroups,
)


def evaluate(facts: HostFacts, cfg: RuntimeConfig) -> list[Check]:
    return [rule(facts, cfg) for rule in RULES]
