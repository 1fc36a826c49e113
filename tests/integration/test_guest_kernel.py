"""Boot the installed guest kernel under QEMU (TCG) and check, from inside, the devices Kata relies on.

One microvm boot carries every virtio-mmio device at once (serial port, erofs block device, 9p, virtio-fs)
and the guest /init reports what it sees; further boots cover erofs as the real root and q35 over PCI.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kata.hypervisor.host import tcg_kernel_params
from kata.sandbox.vm import GUEST_KERNEL_PARAMS as KERNEL_PARAMS

KERNEL = Path("/usr/share/kata-containers/vmlinux.container")
QEMU = "/usr/bin/qemu-system-x86_64"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
BUSYBOX = "/bin/busybox"
BOOT_TIMEOUT = 60.0

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(not KERNEL.exists(), reason=f"{KERNEL} absent: build it with kata.osbuilder.kernel"),
]

# Run by busybox sh as PID 1. Lines start with a tag so the host can pick them out of the console noise.
GUEST_INIT = r"""#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo "KATA uptime $(cut -d' ' -f1 /proc/uptime)"
for p in /sys/class/virtio-ports/*; do
  name=$(cat "$p/name")
  echo "KATA port $name"
  [ "$name" = agent.channel.0 ] && echo "hello-from-guest" > "/dev/${p##*/}"
done
mount -t erofs -o ro /dev/vda /mnt/blk && echo "KATA blk $(cat /mnt/blk/hello)"
mount -t 9p -o trans=virtio,version=9p2000.L kata9p /mnt/9p && echo "KATA 9p $(cat /mnt/9p/hello)"
mount -t virtiofs kataShared /mnt/fs && echo "KATA virtiofs $(cat /mnt/fs/hello)"
mount -t cgroup2 none /mnt/cg && echo "KATA cgroup $(cat /mnt/cg/cgroup.controllers)"
echo "KATA cmdline $(cat /proc/cmdline)"
echo "KATA slab4k $(awk '$1 == "kmalloc-4k" {print $2}' /proc/slabinfo)"
echo "KATA done"
poweroff -f
"""


@dataclass
class Boot:
    """What a guest printed (tagged lines) and host-side timings from QEMU's launch."""

    lines: dict[str, list[str]] = field(default_factory=dict)
    to_init: float | None = None
    to_exit: float | None = None

    def one(self, tag: str) -> str:
        values = self.lines.get(tag, [])
        assert values, f"guest never reported {tag!r}; saw {sorted(self.lines)}"
        return values[0]


def make_initramfs(root: Path, out: Path, init_script: str) -> Path:
    """A busybox root; directories and applet links made here so it also works read-only (erofs)."""
    for d in ("bin", "proc", "sys", "dev", "mnt/blk", "mnt/9p", "mnt/fs", "mnt/cg"):
        (root / d).mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    init = root / "init"
    init.write_text(init_script)
    init.chmod(0o755)
    files = "\n".join(p.relative_to(root).as_posix() for p in sorted(root.rglob("*"))) + "\n"
    with out.open("wb") as f:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files.encode(),
                       stdout=f, check=True)
    return out


def boot(args: list[str], append: str, timeout: float = BOOT_TIMEOUT, memory: str = "512") -> Boot:
    """Launch QEMU, collect tagged console lines, and always kill it on the way out."""
    append = " ".join([append, *tcg_kernel_params()])
    cmd = [QEMU, *args, "-m", memory, "-nographic", "-no-reboot", "-kernel", str(KERNEL), "-append", append]
    result = Boot()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    # A guest can hang silently (FACTS: rare TCG stalls): the watchdog ends QEMU, which ends the read loop.
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    console: list[str] = []
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            console.append(line)
            if line.startswith("KATA "):
                tag, _, value = line[5:].partition(" ")
                result.lines.setdefault(tag, []).append(value)
                if tag == "uptime" and result.to_init is None:
                    result.to_init = time.monotonic() - start
        proc.wait()
        result.to_exit = time.monotonic() - start
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == 0, f"QEMU ended with {proc.returncode}:\n" + "\n".join(console[-30:])
    return result


@pytest.fixture
def shared_dirs(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """Content for each device, and a virtiofsd serving one of them (stopped at teardown)."""
    dirs = {name: tmp_path / name for name in ("blk", "9p", "fs")}
    for name, d in dirs.items():
        d.mkdir()
        (d / "hello").write_text(f"from-{name}\n")
    subprocess.run(["mkfs.erofs", "--quiet", str(tmp_path / "blk.erofs"), str(dirs["blk"])], check=True,
                   stdout=subprocess.DEVNULL)
    sock = tmp_path / "vfs.sock"
    vfsd = subprocess.Popen(
        [VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={dirs['fs']}", "-o", "cache=auto",
         "-o", "sandbox=chroot"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert vfsd.poll() is None, "virtiofsd exited early"
            assert time.monotonic() < deadline, "virtiofsd socket never appeared"
            time.sleep(0.02)
        yield {**dirs, "img": tmp_path / "blk.erofs", "sock": sock}
    finally:
        vfsd.kill()
        vfsd.wait()


def microvm_device_args(d: dict[str, Path], port_out: Path) -> list[str]:
    # virtio-fs goes over PCIe (microvm's pcie=on): as a virtio-mmio vhost-user-fs-device under TCG the
    # guest stalls at random points of the boot (QEMU 7.2); the other devices are fine on virtio-mmio.
    return [
        "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on,pcie=on,memory-backend=mem", "-accel", "tcg",
        "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
        "-chardev", f"file,id=c0,path={port_out}",
        "-device", "virtio-serial-device", "-device", "virtserialport,chardev=c0,name=agent.channel.0",
        "-drive", f"file={d['img']},if=none,id=blk0,format=raw,readonly=on",
        "-device", "virtio-blk-device,drive=blk0",
        "-fsdev", f"local,id=fsd0,path={d['9p']},security_model=none",
        "-device", "virtio-9p-device,fsdev=fsd0,mount_tag=kata9p",
        "-chardev", f"socket,id=fs0,path={d['sock']}",
        "-device", "vhost-user-fs-pci,chardev=fs0,tag=kataShared",
    ]


def test_microvm_devices(tmp_path: Path, shared_dirs: dict[str, Path]) -> None:
    initrd = make_initramfs(tmp_path / "initramfs", tmp_path / "initrd.cpio", GUEST_INIT)
    port_out = tmp_path / "port.out"
    args = [*microvm_device_args(shared_dirs, port_out), "-initrd", str(initrd)]
    result = boot(args, " ".join(KERNEL_PARAMS))

    assert "agent.channel.0" in result.lines.get("port", [])
    assert port_out.read_text().strip() == "hello-from-guest"
    assert result.one("blk") == "from-blk"
    assert result.one("9p") == "from-9p"
    assert result.one("virtiofs") == "from-fs"
    controllers = set(result.one("cgroup").split())
    assert {"cpu", "memory", "pids", "cpuset", "io"} <= controllers, controllers
    # Our kernel patch: virtio-serial posts a bounded number of page-sized receive buffers, not one
    # per ring entry (QEMU's virtio-mmio rings have 1024: the control queue and the port would pin
    # 8 MB of guest memory in kmalloc-4k).
    slab4k = result.one("slab4k")
    assert slab4k, "no kmalloc-4k line in the guest's /proc/slabinfo (CONFIG_SLUB_DEBUG off?)"
    assert int(slab4k) < 512, slab4k
    assert result.lines.get("done")
    # Generous bound: TCG on a loaded 2-core machine; typical is about 1 s.
    assert result.to_init is not None and result.to_init < 20


def test_erofs_as_root(tmp_path: Path) -> None:
    """No initramfs: the kernel itself mounts the erofs image on virtio-blk as / and runs its /init."""
    rootdir = tmp_path / "root"
    make_initramfs(rootdir, tmp_path / "unused.cpio", GUEST_INIT)
    img = tmp_path / "root.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(img), str(rootdir)], check=True, stdout=subprocess.DEVNULL)
    args = [
        "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on", "-accel", "tcg",
        "-drive", f"file={img},if=none,id=root,format=raw,readonly=on",
        "-device", "virtio-blk-device,drive=root",
    ]
    result = boot(args, " ".join([*KERNEL_PARAMS, "root=/dev/vda", "rootfstype=erofs", "ro", "init=/init"]))
    assert "root=/dev/vda" in result.one("cmdline")
    assert result.lines.get("done")


PMEM_INIT = r"""#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo "KATA root $(awk '$2 == "/" {print $4}' /proc/mounts)"
echo "KATA rootdev $(awk '$5 == "/" {print $3}' /proc/self/mountinfo)_$(cat /sys/block/pmem0/dev)"
cached() { awk '$1 == "Cached:" {print $2}' /proc/meminfo; }
before=$(cached)
cat /big > /dev/null
echo "KATA cached_kb $(( $(cached) - before ))"
echo "KATA big $(md5sum < /big)"
mount -t virtiofs kataShared /mnt/fs && echo "KATA virtiofs $(cat /mnt/fs/hello)"
# The guest is root: it writes over the device's last 64 KiB (padding) as a hostile guest would.
blocks=$(( $(cat /sys/block/pmem0/size) / 8 ))
dd if=/dev/urandom of=/dev/pmem0 bs=4096 count=16 seek=$(( blocks - 16 )) conv=fsync 2>/dev/null
echo "KATA wrote $?"
echo "KATA done"
poweroff -f
"""


def test_erofs_root_in_persistent_memory(tmp_path: Path, shared_dirs: dict[str, Path]) -> None:
    """The runtime's layout (kata.hypervisor.qemu_argv): the image file as the guest's second NUMA
    node, read-only and shared, marked persistent memory by memmap= and mounted with DAX, beside
    virtio-fs; above it a little RAM reserved to the firmware's tables. virtiofsd is never handed
    the image (it would die mapping a read-only file writable), reading a file fills no guest page
    cache, and guest writes never reach the file."""
    rootdir = tmp_path / "root"
    make_initramfs(rootdir, tmp_path / "unused.cpio", PMEM_INIT)
    (rootdir / "big").write_bytes(os.urandom(4 << 20))
    img = tmp_path / "root.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", "-Enoinline_data", str(img), str(rootdir)], check=True,
                   stdout=subprocess.DEVNULL)
    os.truncate(img, -(-img.stat().st_size // (2 << 20)) * (2 << 20))
    size_mib = img.stat().st_size >> 20
    digest = hashlib.sha256(img.read_bytes()).hexdigest()
    args = [
        "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on,pcie=on", "-accel", "tcg",
        "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
        "-object", f"memory-backend-file,id=rootfs,mem-path={img},size={size_mib}M,share=on,readonly=on",
        "-object", "memory-backend-ram,id=top,size=4M",
        "-numa", "node,nodeid=0,memdev=mem", "-numa", "node,nodeid=1,memdev=rootfs",
        "-numa", "node,nodeid=2,memdev=top",
        "-chardev", f"socket,id=fs0,path={shared_dirs['sock']}",
        "-device", "vhost-user-fs-pci,chardev=fs0,tag=kataShared",
    ]
    append = " ".join([*KERNEL_PARAMS, f"memmap={size_mib}M!512M", f"memmap=4M${512 + size_mib}M",
                       "root=/dev/pmem0", "rootfstype=erofs", "rootflags=dax=always", "ro", "rootwait",
                       "init=/init"])
    result = boot(args, append, memory=f"{512 + size_mib + 4}M")
    assert "dax=always" in result.one("root").split(","), result.one("root")
    mounted, _, pmem0 = result.one("rootdev").partition("_")
    assert mounted == pmem0, result.one("rootdev")
    assert int(result.one("cached_kb")) < 1024, "a DAX read went through the guest's page cache"
    assert result.one("big").split()[0] == hashlib.md5((rootdir / "big").read_bytes()).hexdigest()
    assert result.one("virtiofs") == "from-fs"
    assert result.one("wrote") == "0"
    assert result.lines.get("done")
    assert hashlib.sha256(img.read_bytes()).hexdigest() == digest, "the guest wrote the host's image"


def test_q35_pci_devices(tmp_path: Path, shared_dirs: dict[str, Path]) -> None:
    initrd = make_initramfs(tmp_path / "initramfs", tmp_path / "initrd.cpio", GUEST_INIT)
    port_out = tmp_path / "port.out"
    d = shared_dirs
    args = [
        "-M", "q35", "-accel", "tcg",
        "-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem",
        "-chardev", f"file,id=c0,path={port_out}",
        "-device", "virtio-serial-pci", "-device", "virtserialport,chardev=c0,name=agent.channel.0",
        "-drive", f"file={d['img']},if=none,id=blk0,format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=blk0",
        "-fsdev", f"local,id=fsd0,path={d['9p']},security_model=none",
        "-device", "virtio-9p-pci,fsdev=fsd0,mount_tag=kata9p",
        "-chardev", f"socket,id=fs0,path={d['sock']}",
        "-device", "vhost-user-fs-pci,chardev=fs0,tag=kataShared",
        "-initrd", str(initrd),
    ]
    result = boot(args, " ".join(KERNEL_PARAMS))
    assert "agent.channel.0" in result.lines.get("port", [])
    assert result.one("blk") == "from-blk"
    assert result.one("9p") == "from-9p"
    assert result.one("virtiofs") == "from-fs"
    assert result.lines.get("done")
