"""Sandboxes restored from one template: each must still be its own machine (entropy, clock), and
get its share (virtio-fs hot-added after the restore, or 9p); and the cold-boot path without one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata.factory.sparse import PAGE, data_regions
from kata.factory.template import TEMPLATE_FORMAT
from kata.guest.agent.mounts import VIRTIOFS_READAHEAD_KB
from tests.conftest import config_with, leftovers, runtime_bin
from tests.integration.test_run import run
from tests.support.bundles import make_busybox_bundle

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("needs_guest")]

# The container's root filesystem type, a fresh random UUID and the clock.
SCRIPT = "awk '$2 == \"/\" {print $3}' /proc/mounts; cat /proc/sys/kernel/random/uuid; date +%s"


def test_clones_diverge_and_keep_time(tmp_path: Path) -> None:
    """... and the share's read-ahead window is the agent's, not FUSE's 128 KiB (the container's
    root is a submount of the share, which has no bdi of its own: the share's is among those of
    anonymous devices)."""
    readahead = "cat /sys/class/bdi/0:*/read_ahead_kb | sort -n | tail -1"
    bundle = make_busybox_bundle(tmp_path / "b", ["sh", "-c", f"{SCRIPT}; {readahead}"])
    subprocess.run([runtime_bin(), "factory", "init"], check=True, capture_output=True, timeout=120)
    uuids = []
    for i in range(2):
        cid = f"tpl-{i}-{tmp_path.name[-8:]}"
        proc = run(bundle, cid)
        assert proc.returncode == 0, proc.stderr.decode()
        fstype, uuid, guest_time, window = proc.stdout.decode().split()
        assert fstype == "virtiofs"  # hot-added to the restored VM
        assert int(window) == VIRTIOFS_READAHEAD_KB
        uuids.append(uuid)
        # The clone's clock is the host's, not the template's (which was snapshotted earlier).
        assert abs(int(guest_time) - time.time()) < 30
        assert leftovers(cid) == []
    # Without a reseed, two clones of one snapshot would draw the same "random" numbers.
    assert uuids[0] != uuids[1]


def test_q35_clones_see_a_new_vm_generation(tmp_path: Path) -> None:
    """On q35 (and pc) the VM has a vmgenid device: a restored clone sees its generation id change
    and the guest kernel reseeds its CRNG at once (microvm's ACPI tables have no vmgenid)."""
    caps = ["CAP_SYSLOG", "CAP_SYS_ADMIN"]
    bundle = make_busybox_bundle(tmp_path / "b", ["sh", "-c", "dmesg | grep -c 'virtual machine fork'"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["capabilities"] = {k: caps for k in ("bounding", "effective", "permitted")}
    (bundle / "config.json").write_text(json.dumps(spec))
    conf = config_with(tmp_path, {"hypervisor.qemu": {"machine_type": "q35"}})
    for i in range(2):
        cid = f"tpl-gen-{i}-{tmp_path.name[-8:]}"
        proc = run(bundle, cid, "--config", str(conf))
        assert (proc.returncode, proc.stdout) == (0, b"1\n"), proc.stderr.decode()
        assert leftovers(cid) == []


def test_template_with_9p(tmp_path: Path, cid: str) -> None:
    """A 9p clone, and the bytes through its share in large messages (the default msize_9p): the
    guest reads a file the host wrote and writes a copy back, 1 MiB per call."""
    volume = tmp_path / "vol"
    volume.mkdir()
    data = os.urandom(5 * 1024 * 1024 + 123)  # not a whole number of messages
    (volume / "in").write_bytes(data)
    copy = "dd if=/v/in of=/v/out bs=1M 2>/dev/null && md5sum < /v/in | cut -c1-32"
    bundle = make_busybox_bundle(tmp_path / "b", ["sh", "-c", f"{SCRIPT}; {copy}"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["mounts"].append({"destination": "/v", "source": str(volume), "options": ["rbind", "rw"]})
    (bundle / "config.json").write_text(json.dumps(spec))
    conf = config_with(tmp_path, {"hypervisor.qemu": {"shared_fs": "virtio-9p"}})
    proc = run(bundle, cid, "--config", str(conf))
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode().split()
    assert out[0] == "9p"
    assert out[-1] == hashlib.md5(data).hexdigest()
    assert (volume / "out").read_bytes() == data
    assert leftovers(cid) == []


def test_cold_boot_with_virtio_fs(tmp_path: Path, cid: str) -> None:
    """enable_template = false: a cold boot, with the virtio-fs device there from the start."""
    bundle = make_busybox_bundle(tmp_path / "b", ["sh", "-c", SCRIPT])
    conf = config_with(tmp_path, {"factory": {"enable_template": False}})
    proc = run(bundle, cid, "--config", str(conf))
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split()[0] == "virtiofs"
    assert leftovers(cid) == []


def test_concurrent_first_runs_share_one_template(tmp_path: Path) -> None:
    """Two first runs of a VM shape at once: one makes the template, the other waits for it."""
    store = tmp_path / "templates"
    conf = config_with(tmp_path, {"factory": {"template_path": str(store)}})
    bundle = make_busybox_bundle(tmp_path / "b", ["echo", "hi"])
    cids = [f"conc-{i}-{tmp_path.name[-8:]}" for i in range(2)]
    procs = [subprocess.Popen([runtime_bin(), "--config", str(conf), "run", "--bundle", str(bundle), c],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for c in cids]
    try:
        results = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err.decode()
        assert out == b"hi\n"
    assert len([d for d in store.iterdir() if d.is_dir()]) == 1
    for c in cids:
        assert leftovers(c) == []


def test_a_clone_holds_only_the_memory_it_uses(tmp_path: Path) -> None:
    """A virtio-fs clone maps its own sparse copy of the template's RAM: QEMU's resident memory is
    what the guest touched, not its whole size (restoring RAM into shared memory would fill it). The
    copy is a memfd QEMU holds, not a file on /run that the guest could grow unnoticed."""
    from kata.config import load_config

    guest_mib = load_config().hypervisor.default_memory
    cid = f"tpl-mem-{tmp_path.name[-8:]}"
    with _sleeping_pod(tmp_path, cid):
        qemu = _qemu_pid(cid)
        memory = _clone_ram(qemu, cid).stat()
        assert memory.st_size >> 20 == guest_mib and memory.st_blocks * 512 >> 20 < guest_mib // 2
        on_disk = sum(f.stat().st_size for f in (Path("/run/vc/vm") / cid).iterdir() if f.is_file())
        assert on_disk < 1 << 20, f"{on_disk} bytes of the VM's run directory"
        rollup = Path(f"/proc/{qemu}/smaps_rollup").read_text().splitlines()
        rss_kib = next(int(line.split()[1]) for line in rollup if line.startswith("Rss:"))
        assert rss_kib >> 10 < guest_mib // 2, f"QEMU holds {rss_kib >> 10} MiB of a {guest_mib} MiB guest"
        # The template's RAM file holds no page of zeroes (its guest zeroed all it had freed, the
        # host cut those out): what the clone copied is what the template's guest was using.
        ours = [d for d in TEMPLATES.iterdir() if (d / "meta.json").is_file() and (d / "memory").is_file()
                and json.loads((d / "meta.json").read_text())["format"] == TEMPLATE_FORMAT]
        assert ours
        for template in ours:
            data, zero = _pages(template / "memory")
            assert zero == 0 and 0 < data * PAGE >> 20 < guest_mib // 6, (template, data, zero)
    assert leftovers(cid) == []


def test_a_pod_gives_back_the_memory_its_workload_freed(tmp_path: Path) -> None:
    """Free page reporting (reclaim_guest_freed_memory, on by default): 200 MB that a process in
    the pod touched and freed go back to the host within seconds, where without it the clone's RAM
    would keep them for the pod's life."""
    cid = f"tpl-fpr-{tmp_path.name[-8:]}"
    with _sleeping_pod(tmp_path, cid) as cli:
        ram = _clone_ram(_qemu_pid(cid), cid)

        def held_mib() -> int:
            return ram.stat().st_blocks * 512 >> 20

        idle = held_mib()
        # busybox dd allocates its 200 MiB buffer and fills it from /dev/zero: every page touched.
        subprocess.run([*cli, "exec", cid, "dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"],
                       check=True, capture_output=True, timeout=120)
        peak = held_mib()
        assert peak >= idle + 150, f"the workload did not show in the clone's RAM: {idle} -> {peak} MiB"
        deadline = time.monotonic() + 60
        while held_mib() > idle + 50 and time.monotonic() < deadline:
            time.sleep(0.5)
        held = held_mib()
        assert held <= idle + 50, f"the pod kept what its workload freed: {idle} -> {peak} -> {held} MiB"
    assert leftovers(cid) == []


@contextlib.contextmanager
def _sleeping_pod(tmp_path: Path, cid: str) -> Iterator[list[str]]:
    """A container (busybox sleep) started with kata-runtime, deleted afterwards; yields the command
    line that names its state root."""
    bundle = make_busybox_bundle(tmp_path / "b", ["sleep", "1000"])
    cli = [runtime_bin(), "--root", str(tmp_path / "root")]
    with open(tmp_path / "out", "wb") as out:
        subprocess.run([*cli, "create", "--bundle", str(bundle), cid], check=True, stdout=out, stderr=out,
                       stdin=subprocess.DEVNULL, timeout=120)
    try:
        subprocess.run([*cli, "start", cid], check=True, capture_output=True, timeout=60)
        yield cli
    finally:
        subprocess.run([*cli, "delete", "--force", cid], capture_output=True, timeout=60)


def _qemu_pid(cid: str) -> int:
    return int((Path("/run/vc/vm") / cid / "qemu.pid").read_text().split()[0])


def _clone_ram(qemu: int, cid: str) -> Path:
    """QEMU's descriptor of the clone's RAM, the memfd the runtime copied the template's into."""
    fds = Path(f"/proc/{qemu}/fd")
    memfds = [fd for fd in fds.iterdir() if os.readlink(fd).startswith(f"/memfd:kata-{cid} ")]
    assert memfds, "QEMU holds no memfd for the clone's RAM"
    return memfds[0]


TEMPLATES = Path("/run/vc/templates")


def _pages(path: Path) -> tuple[int, int]:
    """(allocated pages, allocated pages of zeroes) of a sparse file."""
    data = zero = 0
    with open(path, "rb") as f:
        for start, end in data_regions(f.fileno()):
            buf = os.pread(f.fileno(), end - start, start)
            for off in range(0, len(buf), PAGE):
                data += 1
                zero += not any(buf[off:off + PAGE])
    return data, zero


def _rollup(pid: int) -> dict[str, int]:
    lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    return {line.split(":")[0]: int(line.split()[1]) for line in lines if line.endswith(" kB")}


def test_9p_clones_map_the_template_copy_on_write(tmp_path: Path) -> None:
    """Without vhost-user (9p), a clone maps the template's RAM file privately: two clones share the
    pages neither wrote (each one's PSS is well under its RSS), and what a clone writes never
    reaches the template's file."""
    import hashlib

    conf = config_with(tmp_path, {"hypervisor.qemu": {"shared_fs": "virtio-9p"}})
    root = tmp_path / "root"
    cli = [runtime_bin(), "--root", str(root), "--config", str(conf)]
    bundle = make_busybox_bundle(tmp_path / "b", ["sleep", "1000"])
    cids = [f"tpl-cow-{i}-{tmp_path.name[-8:]}" for i in range(2)]
    try:
        for cid in cids:
            with open(tmp_path / "out", "wb") as out:
                subprocess.run([*cli, "create", "--bundle", str(bundle), cid], check=True, stdout=out,
                               stderr=out, stdin=subprocess.DEVNULL, timeout=120)
            subprocess.run([*cli, "start", cid], check=True, capture_output=True, timeout=60)
        qemus = [int((Path("/run/vc/vm") / cid / "qemu.pid").read_text().split()[0]) for cid in cids]
        maps = Path(f"/proc/{qemus[0]}/maps").read_text().splitlines()
        (template,) = {Path(line.split()[-1]) for line in maps if line.endswith("/memory")}
        assert all(str(template) in Path(f"/proc/{q}/maps").read_text() for q in qemus)
        digest = hashlib.sha256(template.read_bytes()).hexdigest()
        mtime = template.stat().st_mtime_ns
        for q in qemus:
            rollup = _rollup(q)
            # The template's pages both clones read count half in each one's PSS.
            assert rollup["Shared_Clean"] >> 10 > 16, rollup
            assert rollup["Pss"] < rollup["Rss"] - (8 << 10), rollup
        # A clone that writes 64 MiB of its memory (a tmpfs file) changes its own pages only.
        subprocess.run([*cli, "exec", cids[0], "sh", "-c", "dd if=/dev/urandom of=/tmp/x bs=1M count=64"],
                       check=True, capture_output=True, timeout=120)
        assert template.stat().st_mtime_ns == mtime
        assert hashlib.sha256(template.read_bytes()).hexdigest() == digest
    finally:
        for cid in cids:
            subprocess.run([*cli, "delete", "--force", cid], capture_output=True, timeout=60)
    for cid in cids:
        assert leftovers(cid) == []
