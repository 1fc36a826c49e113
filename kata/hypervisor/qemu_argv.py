"""VMConfig → QEMU command line. Pure: no I/O, so every combination is unit-tested."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kata.protocols import debug_console
from kata.protocols.agent_api import AGENT_SERIAL_PORT_NAME, HELPER_ASLR_PARAM

from .base import HypervisorError, VMConfig
from .host import tcg_kernel_params

MACHINES = ("microvm", "q35", "pc")
# DIMM slots offered for memory hotplug on q35/pc.
MEMORY_SLOTS = 8
# microvm: no PCI, no option ROMs; ISA serial for the console; ACPI stays on, it is how microvm powers off.
# No PIT: the guest never uses it (its clock and timer are the TSC and the local APIC, the TSC's rate
# is on the command line), yet QEMU's emulation woke its main loop every 27 ms of an idle VM.
MICROVM_MACHINE = "microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=off"
TCG_CPU = "qemu64,+rdrand,+arat,+tsc-deadline"


@dataclass(frozen=True)
class RunPaths:
    """Where one VM's sockets and files live inside its run_dir."""

    run_dir: Path

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.run_dir / "agent.sock"

    @property
    def console_socket(self) -> Path:
        """The host end of the debug console's virtio-serial port."""
        return self.run_dir / "console.sock"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "qemu.log"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "qemu.json"


# The guest console is a ring in QEMU's memory (read over QMP, ringbuf-read): a guest that prints
# without end costs at most this much, and never fills a host filesystem. A power of two.
CONSOLE_RING_BYTES = 128 * 1024
CONSOLE_CHARDEV = "console"
# QEMU's seccomp filter: no obsolete syscalls, no setuid/setgid, no fork/exec, no scheduler or
# affinity changes (Kata's seccompsandbox). spawn=deny is why migrations go through fds, not exec:.
DEFAULT_SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


@dataclass(frozen=True)
class Restore:
    """What a restore hands QEMU: the saved state as an inherited descriptor, and for a clone of a
    file-backed template its RAM: either its own copy (``memory_fd``, a memfd, shared with
    virtiofsd) or the template's file mapped copy-on-write (``memory_path``: clones share every page
    none of them wrote; only without vhost-user, which needs RAM it can map too)."""

    state_fd: int
    memory_fd: int | None = None
    memory_path: Path | None = None


@dataclass(frozen=True)
class Vsock:
    cid: int
    # An open /dev/vhost-vsock fd that already holds the cid (passed to QEMU), or None to let QEMU open it.
    vhostfd: int | None = None


def opt_value(value: object) -> str:
    """A value inside a QEMU option string (``key=value,key=value``): QEMU reads a comma as the next
    option unless it is doubled, so a path with one (an image an annotation names) would add
    options of its own (``/x,readonly=off``)."""
    return str(value).replace(",", ",,")


def hotplug_capable(machine: str) -> bool:
    return machine in ("q35", "pc")


# The PCIe root port a hot-added virtio-fs device goes into.
FS_ROOT_PORT = "fsport"
# Root ports for network interfaces hot-added at start: Docker connects a container's network only
# after create (its prestart hook), when the VM already runs.
NIC_ROOT_PORTS = ("netport0", "netport1", "netport2", "netport3")


# Guest RAM and the image's persistent memory must lie below this guest address (microvm splits RAM
# at 3 GiB): the image is mapped right after RAM, and the guest is told where (memmap=). A bigger
# VM reads its image from a virtio-blk disk.
PMEM_LIMIT = 2 << 30
PMEM_ALIGN = 2 << 20
# The id of the image's memory backend: QEMU's second NUMA node, placed right after the first (the
# guest, given no SRAT on microvm, sees one flat memory map).
IMAGE_MEMDEV = "rootfs"
# RAM after the image, at the top of guest memory, where the firmware and QEMU put their tables (and
# SeaBIOS its buffers): were the image last, their writes would vanish into it. The guest kernel
# is told it is reserved (memmap=$) and never allocates from it, so it is anonymous memory, never
# handed to virtiofsd, and a snapshot keeps it in the state.
TOP_MEMDEV = "top"
TOP_MIB = 4


# Kernel parameters that would undo the layout: a caller who sets one gets the disk.
_PMEM_PARAMS = frozenset({"memmap", "root", "rootfstype", "rootflags"})


@dataclass(frozen=True)
class PmemLayout:
    """Where the guest's memory nodes lie, in MiB from 0: RAM, then the image, then ``TOP_MIB``."""

    ram_mib: int
    image_mib: int

    @property
    def image_start_mib(self) -> int:
        return self.ram_mib

    @property
    def top_start_mib(self) -> int:
        return self.ram_mib + self.image_mib

    @property
    def total_mib(self) -> int:
        return self.top_start_mib + TOP_MIB


def pmem_layout(config: VMConfig) -> PmemLayout | None:
    """The layout when the root image is mapped into the guest as persistent memory (DAX), None when
    it is a virtio-blk disk. Only on microvm: on q35 (ACPI PCI hotplug, SeaBIOS) a restored clone
    given a device dropped every PCIe root port it had, with this layout. Not with an initrd: QEMU
    loads it at the top of guest memory, which is then too small. Linux maps persistent memory only
    in 2 MiB sections, so RAM (where the image starts) and the image come in whole ones."""
    size = config.image_pmem_size
    align_mib = PMEM_ALIGN >> 20
    if (config.machine_type != "microvm" or config.image is None or config.initrd is not None
            or size <= 0 or size % PMEM_ALIGN or config.memory_mib % align_mib
            or any(p.split("=", 1)[0] in _PMEM_PARAMS for p in config.kernel_params)):
        return None
    layout = PmemLayout(config.memory_mib, size >> 20)
    return layout if layout.total_mib << 20 <= PMEM_LIMIT else None


def image_on_pmem(config: VMConfig) -> bool:
    return pmem_layout(config) is not None


def kernel_cmdline(config: VMConfig, vsock: bool) -> str:
    """The driver's own parameters (they follow from how it wires devices), then the caller's.

    A driver parameter is left out when the caller already sets the same key.
    """
    # The debug console's parameters are the driver's alone: only a VM given the console's channel
    # gets them, whatever the caller's kernel_params say.
    callers = [p for p in config.kernel_params
               if p.split("=", 1)[0] not in (debug_console.KERNEL_PARAM, debug_console.VPORT_PARAM)]
    given = {p.split("=", 1)[0] for p in callers}
    own: list[str] = ["console=ttyS0"]
    if (layout := pmem_layout(config)) is not None:
        # The range after RAM is the image (legacy e820 persistent memory, hence pmem0). Its
        # namespace is probed asynchronously: rootwait.
        own += [f"memmap={layout.image_mib}M!{layout.image_start_mib}M",
                f"memmap={TOP_MIB}M${layout.top_start_mib}M",
                "root=/dev/pmem0", "rootfstype=erofs", "rootflags=dax=always", "ro", "rootwait"]
    elif config.image is not None:
        # The image is the only virtio-blk disk, hence vda.
        own += ["root=/dev/vda", "rootfstype=erofs", "ro"]
    if vsock:
        own.append("agent.channel=vsock")
    if config.debug_console:
        own.append(debug_console.KERNEL_PARAM)
        if vsock:
            own.append(f"{debug_console.VPORT_PARAM}={debug_console.VSOCK_PORT}")
    fs = config.shared_fs
    if fs is not None and fs.kind == "virtio-fs" and fs.hotplug and config.machine_type == "microvm":
        # microvm's ACPI tables do not hand PCIe hotplug to the OS: without this the kernel never
        # notices the virtio-fs device added after a restore.
        own.append("pcie_ports=native")
    if config.accel == "tcg":
        # The agent's helpers (crun above all) at fixed addresses: TCG's translations then serve
        # every run of them; containers keep randomisation (kata.guest.agent.layout).
        own.append(f"{HELPER_ASLR_PARAM}=off")
    if config.accel == "tcg" and config.machine_type == "microvm":
        # microvm has no PIT/HPET/PM timer to calibrate the TSC against; under TCG the guest then
        # marks the TSC unstable and most boots hang. TCG's TSC is the host's, so its rate is known.
        own += tcg_kernel_params()
    kept = [p for p in own if p.split("=", 1)[0] not in given]
    return " ".join([*kept, *callers])


def validate(config: VMConfig) -> None:
    if config.machine_type not in MACHINES:
        choices = ", ".join(MACHINES)
        raise HypervisorError(f"unsupported machine type {config.machine_type!r} (use one of {choices})")
    if not 1 <= config.vcpus <= config.max_vcpus:
        raise HypervisorError(f"need 1 <= vcpus ({config.vcpus}) <= max_vcpus ({config.max_vcpus})")
    if not 0 < config.memory_mib <= config.max_memory_mib:
        raise HypervisorError(
            f"need 0 < memory_mib ({config.memory_mib}) <= max_memory_mib ({config.max_memory_mib})"
        )
    fs = config.shared_fs
    if fs is not None and fs.kind == "virtio-fs" and fs.vhost_user_socket is None:
        raise HypervisorError("virtio-fs shared directory needs the virtiofsd socket (vhost_user_socket)")


def file_backed_ram(config: VMConfig, restore: Restore | None = None) -> bool:
    """Guest RAM lives in a file (config.memory_file, or the restore's memfd or template file), so a
    snapshot leaves it out and a restore takes it from there (x-ignore-shared)."""
    return config.memory_file is not None or (
        restore is not None and (restore.memory_fd is not None or restore.memory_path is not None))


def ignores_shared(config: VMConfig, restore: Restore | None = None) -> bool:
    """A snapshot of this VM leaves out its shared, file-backed memory (x-ignore-shared): RAM in a
    file, and the image's persistent memory, which a restore could not write (it is read-only)."""
    return file_backed_ram(config, restore) or image_on_pmem(config)


def ram_backend(config: VMConfig, restore: Restore | None) -> str | None:
    """The -object that holds guest RAM, when it is not QEMU's anonymous memory."""
    size = f"size={config.memory_mib}M"
    fs = config.shared_fs
    if restore is not None and restore.memory_path is not None:
        if fs is not None and fs.kind == "virtio-fs":
            raise HypervisorError("a copy-on-write clone cannot have virtio-fs: vhost-user needs shared RAM")
        if config.free_page_reporting:
            raise HypervisorError("a copy-on-write clone cannot report freed memory: QEMU would "
                                  "discard it from the template's file")
        # share=off: the clone's writes go to its own anonymous pages, never to the template's file.
        return f"memory-backend-file,id=mem,{size},mem-path={opt_value(restore.memory_path)},share=off"
    memory_file: Path | str | None = config.memory_file
    if restore is not None and restore.memory_fd is not None:
        memory_file = f"/proc/self/fd/{restore.memory_fd}"  # QEMU opens its inherited memfd again
    if memory_file is not None:
        return f"memory-backend-file,id=mem,{size},mem-path={opt_value(memory_file)},share=on"
    if fs is not None and fs.kind == "virtio-fs":
        return f"memory-backend-memfd,id=mem,{size},share=on"  # vhost-user needs RAM it can map
    return None


def build_argv(config: VMConfig, vsock: Vsock | None = None, restore: Restore | None = None,
               seccomp: str = DEFAULT_SECCOMP, image_fd: int | None = None) -> list[str]:
    """The full QEMU argv; ``vsock`` is required when ``config.agent_channel == "vsock"``.

    ``image_fd``: the image, opened by the caller and inherited by QEMU, which then opens that file
    (/proc/self/fd/N) rather than whatever the path names by then. Without it, the path (a template
    key's argv, which must not depend on a descriptor's number).

    ``restore``: the descriptors of a state written by ``save`` (the same config must be used).
    ``seccomp``: QEMU's -sandbox options; empty for none.
    """
    validate(config)
    if config.agent_channel == "vsock" and vsock is None:
        raise HypervisorError("agent channel vsock needs a guest cid")
    paths = RunPaths(config.run_dir)
    mmio = config.machine_type == "microvm"

    def dev(kind: str) -> str:
        # virtio-mmio on microvm (no PCI), PCI elsewhere.
        return f"{kind}-device" if mmio else f"{kind}-pci"

    machine = MICROVM_MACHINE if mmio else config.machine_type
    fs = config.shared_fs
    virtio_fs = fs is not None and fs.kind == "virtio-fs"
    ram = ram_backend(config, restore)
    layout = pmem_layout(config)
    pmem = layout is not None
    image = f"/proc/self/fd/{image_fd}" if image_fd is not None else config.image
    if pmem and ram is None:
        ram = f"memory-backend-ram,id=mem,size={config.memory_mib}M"  # NUMA nodes need a memdev
    if ram is not None and not pmem:
        # memory-backend= works on microvm and q35/pc alike.
        machine += ",memory-backend=mem"
    fs_hotplug = virtio_fs and fs is not None and fs.hotplug
    if (fs_hotplug or pmem) and mmio:
        # microvm has PCIe only on request: the hot-added vhost-user-fs-pci needs a root port, and
        # Linux registers legacy persistent memory only in its PCI resource survey.
        machine += ",pcie=on"

    argv = [
        str(config.hypervisor_path),
        "-name", f"kata-{config.id}",
        "-machine", machine,
        "-accel", config.accel,
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
    ]  # fmt: skip
    if mmio:
        # virtio-mmio is legacy (v1) by default; vhost-user backends (virtiofsd) refuse legacy devices.
        argv += ["-global", "virtio-mmio.force-legacy=false"]
    if config.accel == "kvm":
        argv += ["-cpu", "host"]
    else:
        # TCG's default model is faster to emulate than -cpu max, but lacks RDRAND: the guest's
        # entropy pool then fills only by jitter, and Python's first getrandom() burns ~3 s of
        # guest CPU at agent start. TCG emulates RDRAND from the host's random source.
        # ARAT says the APIC timer keeps running while the CPU idles, which QEMU's does: without it
        # Linux cannot stop its tick in idle (no broadcast timer on these machines), and an idle VM
        # woke QEMU 250 times a second. TSC-deadline makes each timer a single MSR write.
        argv += ["-cpu", TCG_CPU]

    hotplug = hotplug_capable(config.machine_type)
    maxcpus = config.max_vcpus if hotplug else config.vcpus
    argv += ["-smp", f"{config.vcpus},maxcpus={maxcpus}"]
    # QEMU counts the image's node (and the one above it) in the machine's memory; the guest sees
    # persistent memory, and memory reserved to the firmware. (Only microvm, which has no hotplug.)
    memory = f"{config.memory_mib if layout is None else layout.total_mib}M"
    if hotplug and config.max_memory_mib > config.memory_mib:
        memory += f",slots={MEMORY_SLOTS},maxmem={config.max_memory_mib}M"
    argv += ["-m", memory]
    if ram is not None:
        argv += ["-object", ram]
    if pmem:
        # The image file itself, read-only and shared: a ROM region to QEMU, so the guest cannot
        # write it, a snapshot leaves it out, and vhost-user (virtiofsd) is never handed it.
        argv += [
            "-object", f"memory-backend-file,id={IMAGE_MEMDEV},mem-path={opt_value(image)},"
                       f"size={config.image_pmem_size},share=on,readonly=on",
            "-object", f"memory-backend-ram,id={TOP_MEMDEV},size={TOP_MIB}M",
            "-numa", "node,nodeid=0,memdev=mem",
            "-numa", f"node,nodeid=1,memdev={IMAGE_MEMDEV}",
            "-numa", f"node,nodeid=2,memdev={TOP_MEMDEV}",
        ]  # fmt: skip

    argv += [
        "-chardev", f"socket,id=qmp,path={opt_value(paths.qmp_socket)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"ringbuf,id={CONSOLE_CHARDEV},size={CONSOLE_RING_BYTES}",
        "-serial", f"chardev:{CONSOLE_CHARDEV}",
        "-pidfile", str(paths.pid_file),
    ]  # fmt: skip
    if seccomp:
        argv += ["-sandbox", seccomp]
    if hotplug_capable(config.machine_type):
        # A generation id that changes with every restore: the guest kernel reseeds its CRNG when
        # it changes, so clones of one template do not share the template's randomness. Only pc and
        # q35 put it in the guest's ACPI tables (microvm accepts the device and hides it).
        argv += ["-device", "vmgenid,guid=auto"]

    argv += ["-kernel", str(config.kernel)]
    if config.initrd is not None:
        argv += ["-initrd", str(config.initrd)]
    argv += ["-append", kernel_cmdline(config, vsock=config.agent_channel == "vsock")]

    if config.free_page_reporting:
        # Only reporting: the balloon is never inflated (the guest's size is its size).
        argv += ["-device", f"{dev('virtio-balloon')},id=balloon0,free-page-reporting=on"]

    if config.image is not None and not pmem:
        argv += [
            "-drive", f"file={opt_value(image)},if=none,id=rootfs,format=raw,readonly=on",
            "-device", f"{dev('virtio-blk')},drive=rootfs",
        ]  # fmt: skip

    if config.agent_channel == "vsock":
        assert vsock is not None
        opts = f"{dev('vhost-vsock')},id=vsock0,guest-cid={vsock.cid}"
        if vsock.vhostfd is not None:
            opts += f",vhostfd={vsock.vhostfd}"
        argv += ["-device", opts]
    else:
        # Only the ports we add: the guest sets up a pair of 1024-entry rings for each of the
        # default 31 (about 3 MB of guest memory), and port number 0 is kept for a console.
        ports = 2 if config.debug_console else 1
        argv += [
            "-device", f"{dev('virtio-serial')},id=vser0,max_ports={ports + 1}",
            "-chardev", f"socket,id=agent,path={opt_value(paths.agent_socket)},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={AGENT_SERIAL_PORT_NAME}",
        ]  # fmt: skip
        if config.debug_console:
            # A port of its own beside the agent's, behind a socket in the same root-only directory
            # (on vsock the guest listens on a port of the device the agent already has).
            argv += [
                "-chardev", f"socket,id=dbgcon,path={opt_value(paths.console_socket)},server=on,wait=off",
                "-device", f"virtserialport,bus=vser0.0,chardev=dbgcon,name={debug_console.SERIAL_PORT_NAME}",
            ]  # fmt: skip

    if fs_hotplug:
        argv += ["-device", f"pcie-root-port,id={FS_ROOT_PORT},bus=pcie.0,chassis=1,slot=0"]
        for n, port in enumerate(NIC_ROOT_PORTS, start=2):
            argv += ["-device", f"pcie-root-port,id={port},bus=pcie.0,chassis={n},slot=0"]
    elif fs is not None:
        if fs.kind == "virtio-fs":
            argv += [
                "-chardev", f"socket,id=vfs,path={opt_value(fs.vhost_user_socket)}",
                "-device", f"{dev('vhost-user-fs')},chardev=vfs,tag={fs.tag}",
            ]  # fmt: skip
        else:
            argv += [
                # multidevs=remap keeps inode numbers unique when the export spans several host filesystems.
                "-fsdev", f"local,id=fs9p,path={opt_value(fs.host_dir)},security_model=none,multidevs=remap",
                "-device", f"{dev('virtio-9p')},fsdev=fs9p,mount_tag={fs.tag}",
            ]  # fmt: skip

    if restore is not None and ignores_shared(config, restore):
        # Guest RAM (or the image) is already in its file: the state is loaded once x-ignore-shared
        # is set (QMP).
        argv += ["-incoming", "defer"]
    elif restore is not None:
        argv += ["-incoming", f"fd:{restore.state_fd}"]
    argv += list(config.extra_args)
    return argv
