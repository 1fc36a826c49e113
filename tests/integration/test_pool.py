"""The warm VM pool (kata.factory.pool) end to end: `kata-runtime factory init` starts the daemon with
two clones of the default shape; `kata-runtime run`, CRI pods and Docker containers take them (the
sandbox's QEMU is a pid the pool had ready, and nothing was restored for it), with their virtio-fs
share and first NIC attached already and their guest warmed up, the pool refills, pooled pods reach
each other over the pooled NIC (its tap moved into the pod's namespace) and read a virtio-fs volume,
an unused pooled NIC is given back, a pooled QEMU that dies ends its pod's tasks with 255, its QEMU
joins the pod's cgroups; a stopped pool falls back to a restore; a daemon killed with SIGKILL leaves
no QEMU behind; nothing is left after."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kata.factory import pool
from kata.sandbox.paths import POOL_ROOT, POOL_SHARES_ROOT, SHARED_ROOT, STATE_ROOT, VM_ROOT
from kata.utils.mount import mounts_under
from kata.utils.process import descendants
from tests.conftest import (
    cgroup_of,
    config_with,
    leftovers,
    pids_naming,
    process_gone,
    runtime_bin,
    wait_for,
)
from tests.integration.conftest import _fail_on_leftovers, _kata_sandboxes, daemons_unavailable
from tests.support.bundles import make_busybox_bundle
from tests.support.cri import CriClient, Pod
from tests.support.cri_config import KATA
from tests.support.daemons import Containerd, Runtime, docker_daemons, kata_runtime_path
from tests.support.netns import in_netns, temporary_netns

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("needs_guest")]

CONFIG = Path("/run/kata-pool-configuration.toml")
CRI_RUNTIMES = {"kata-pool": dataclasses.replace(KATA, options={"ConfigPath": str(CONFIG)})}
N = 2
PORT = 8080
SERVER = ["sh", "-c", f"mkdir -p /www && echo pooled > /www/index.html && exec httpd -f -p {PORT} -h /www"]


def _endpoint() -> Path:
    from kata.config import load_config

    return Path(load_config(CONFIG).factory.vm_cache_endpoint)


def _status() -> dict[str, Any]:
    return pool.call(_endpoint(), {"op": "status"}, 5)


def _ready_vms(n: int = N) -> list[dict[str, Any]]:
    """Wait until the pool has ``n`` clones ready; what its status says of each."""
    def enough() -> dict[str, Any] | None:
        st = _status()
        return st if len(st["ready"]) >= n else None

    return list(wait_for(enough, 120, f"{n} pooled VMs")["ready"])


def _ready(n: int = N) -> set[int]:
    """Wait until the pool has ``n`` clones ready; their QEMU pids."""
    return {vm["pid"] for vm in _ready_vms(n)}


def _qemu_pids() -> set[int]:
    return pids_naming("qemu-system")


def _factory(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([runtime_bin(), "--config", str(CONFIG), "factory", *args], capture_output=True,
                          text=True, timeout=timeout)


def _create(cli: list[str], bundle: Path, cid: str, out_path: Path) -> None:
    """`create`, its output to a file: the container's monitor, which it leaves running, keeps it open."""
    with open(out_path, "wb") as out:
        subprocess.run([*cli, "create", "--bundle", str(bundle), cid], check=True, stdout=out, stderr=out,
                       stdin=subprocess.DEVNULL, timeout=120)


@pytest.fixture(scope="module", autouse=True)
def pool_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    made = config_with(tmp_path_factory.mktemp("pool"), {"factory": {"vm_cache_number": N}})
    CONFIG.write_text(made.read_text())
    yield CONFIG
    CONFIG.unlink(missing_ok=True)


@pytest.fixture
def pool_daemon(pool_config: Path) -> Iterator[int]:
    """The pool daemon as `factory init` starts it; its pid. Stopped (its VMs with it) after."""
    before = _qemu_pids()
    proc = _factory("init")
    assert proc.returncode == 0, proc.stderr
    assert "VM pool daemon started" in proc.stdout, proc.stdout
    pid = int(_status()["pid"])
    try:
        yield pid
    finally:
        pool.stop(_endpoint())
        if not process_gone(pid):
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not (_qemu_pids() - before), 30, "the pool's VMs gone")
        assert not any(p.is_dir() for p in POOL_ROOT.iterdir()), list(POOL_ROOT.iterdir())
        assert not list(POOL_SHARES_ROOT.iterdir()) and not mounts_under(str(POOL_SHARES_ROOT))


def test_runtime_takes_a_pooled_vm_and_the_pool_refills(tmp_path: Path, cid: str, pool_daemon: int) -> None:
    vms = _ready_vms()
    ready = {vm["pid"] for vm in vms}
    # Each clone's virtio-fs share is served and hot-added before any sandbox asks.
    served = {vm["virtiofsd"] for vm in vms}
    assert 0 not in served, vms
    # Each clone's guest ran its warm-up container after the restore (TCG translated its start-up).
    assert all(vm["warm"] for vm in vms), vms
    status = _factory("status")
    assert f"VM pool: daemon pid {pool_daemon} " in status.stdout and f"{N}/{N} ready" in status.stdout
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "hello").write_text("from the host\n")
    mounts = [{"destination": "/vol", "type": "bind", "source": str(volume), "options": ["rbind", "rw"]}]
    script = "cat /vol/hello; echo out > /vol/back; sleep 1000"
    bundle = make_busybox_bundle(tmp_path / "b", ["sh", "-c", script])
    spec = json.loads((bundle / "config.json").read_text())
    spec["mounts"] += mounts
    (bundle / "config.json").write_text(json.dumps(spec))
    root = tmp_path / "root"
    # (no --debug: it puts agent.log=debug on the guest's command line, another VM shape than the pool's)
    cli = [runtime_bin(), "--root", str(root), "--config", str(CONFIG)]
    _create(cli, bundle, cid, tmp_path / "create.out")
    try:
        qemu = int((VM_ROOT / cid / "qemu.pid").read_text().split()[0])
        # The sandbox's QEMU is one the pool had ready: nothing was restored for it.
        assert qemu in ready, (qemu, ready)
        state = json.loads((VM_ROOT / cid / "qemu.json").read_text())
        assert state["id"] == cid and state["pid"] == qemu
        # Its virtiofsd came with it, serving the sandbox's own shared directory.
        virtiofsd = int((VM_ROOT / cid / "vhost-fs.sock.pid").read_text().split()[0])
        assert virtiofsd in served, (virtiofsd, served)
        assert any(p.startswith(str(SHARED_ROOT / cid) + "/") for p in mounts_under(str(SHARED_ROOT / cid)))
        subprocess.run([*cli, "start", cid], check=True, capture_output=True, timeout=60)
        wait_for(lambda: (volume / "back").exists(), 30, "the container's write through virtio-fs")
        assert (volume / "back").read_text() == "out\n"
        # The pool refills behind it, and forgot the VM it handed over.
        refilled = _ready()
        assert qemu not in refilled and _status()["taken"] == 1
        # This container has no network namespace of its own: the pooled NIC went unused, its tap
        # was deleted in the pool's namespace (only the ready clones' are there), and the guest
        # gives the NIC back (PCIe unplug takes the guest ~5 s).
        links = in_netns(f"/proc/{pool_daemon}/ns/net", "ip", "-o", "link", "show").stdout
        assert links.count(": kpool") == N, links
        def guest_links() -> list[str]:
            return subprocess.run([*cli, "exec", cid, "ls", "/sys/class/net"], capture_output=True, text=True,
                                  timeout=30).stdout.split()

        wait_for(lambda: "eth0" not in guest_links(), 30, "the unused NIC gone")
    finally:
        subprocess.run([*cli, "delete", "--force", cid], capture_output=True, timeout=60)
    assert process_gone(qemu)
    assert leftovers(cid) == []


def test_killed_daemon_leaves_no_vm_and_its_handed_vm_lives_on(tmp_path: Path, cid: str,
                                                                  pool_daemon: int) -> None:
    _ready()
    root = tmp_path / "root"
    cli = [runtime_bin(), "--root", str(root), "--config", str(CONFIG)]
    bundle = make_busybox_bundle(tmp_path / "b", ["sleep", "1000"])
    _create(cli, bundle, cid, tmp_path / "create.out")
    try:
        taken = int((VM_ROOT / cid / "qemu.pid").read_text().split()[0])
        pooled = _ready()
        assert taken not in pooled
        os.kill(pool_daemon, signal.SIGKILL)
        # Its watcher kills what was still in the pool, and only that.
        wait_for(lambda: all(process_gone(p) for p in pooled), 30, "the pooled VMs killed")
        wait_for(lambda: not any(p.is_dir() for p in POOL_ROOT.iterdir()), 10, "the pool's directories gone")
        assert not list(POOL_SHARES_ROOT.iterdir()) and not mounts_under(str(POOL_SHARES_ROOT))
        # The pooled clones' virtiofsd went with them; the handed-over one (its command line still
        # names the directory it was started on) serves on.
        handed = int((VM_ROOT / cid / "vhost-fs.sock.pid").read_text().split()[0])
        assert not process_gone(handed)
        assert pids_naming("virtiofsd", f"source={POOL_SHARES_ROOT}/") <= {handed, *descendants(handed)}
        assert not process_gone(taken)
        subprocess.run([*cli, "start", cid], check=True, capture_output=True, timeout=60)
        state = subprocess.run([*cli, "state", cid], check=True, capture_output=True, timeout=30)
        assert json.loads(state.stdout)["status"] == "running"
    finally:
        subprocess.run([*cli, "delete", "--force", cid], capture_output=True, timeout=60)
    assert process_gone(taken) and leftovers(cid) == []
    # Without a daemon, a sandbox restores its VM as before, without an error.
    other = f"{cid}-r"
    proc = subprocess.run([runtime_bin(), "--config", str(CONFIG), "run", "--bundle",
                           str(make_busybox_bundle(tmp_path / "c", ["echo", "restored"])), other],
                          capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert (proc.returncode, proc.stdout) == (0, b"restored\n"), proc.stderr
    assert leftovers(other) == []


def _fetch(cri: CriClient, cid: str, host: str) -> str:
    script = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {host} {PORT}"
    deadline = time.monotonic() + 30
    while True:
        result = cri.exec_sync(cid, ["sh", "-c", script], timeout=20)
        if result.exit_code == 0 and " 200 " in result.stdout or time.monotonic() > deadline:
            return result.stdout
        time.sleep(0.2)


def test_cri_pods_take_pooled_vms_with_network_and_cgroups(cri: CriClient, cri_containerd: Containerd,
                                                           pool_daemon: int) -> None:
    ready = _ready()
    pods: list[Pod] = []
    try:
        for name in ("web", "client"):
            uid = uuid.uuid4().hex[:12]
            pods.append(cri.run_pod(name, "default", uid, "kata-pool",
                                    cgroup_parent=cri_containerd.cgroup_parent))
        web, client = pods
        server = cri.run_container(web, "server", cri_containerd.image, SERVER)
        qemu = cri.container_pid(server)
        assert qemu in ready, (qemu, ready)
        # The pooled QEMU, born in the daemon's cgroups, joined the pod's, where the shim is; it stays
        # in the daemon's network namespace, not the pod's.
        (shim,) = pids_naming("containerd-shim-kata-v2", web.id)
        for c in ("memory", "cpu", "pids"):
            assert cgroup_of(qemu, c) == cgroup_of(shim, c) != cgroup_of(pool_daemon, c), c
        netns_web = cri.pod_netns(web.id)
        assert os.stat(f"/proc/{qemu}/ns/net").st_ino != os.stat(netns_web).st_ino
        # Its first NIC came with it: the tap QEMU held in the pool moved into the pod's namespace,
        # and the guest's link took the pod's MAC (the pool's is gone from it).
        record = json.loads((STATE_ROOT / "sbs" / web.id / "pod.json").read_text())
        assert record["pooled_nic"]["tap"] == "tap0_kata" and record["network"] == [["eth0", "tap0_kata"]]
        links = json.loads(in_netns(netns_web, "ip", "-j", "link", "show").stdout)
        eth0 = next(link for link in links if link["ifname"] == "eth0")
        tap = next(link for link in links if link["ifname"] == "tap0_kata")
        assert tap.get("ifalias") == "kata-tap"
        guest = cri.exec_sync(server, ["cat", "/sys/class/net/eth0/address"])
        assert guest.stdout.strip() == eth0["address"] != record["pooled_nic"]["mac"], guest
        # Networking through taps handed over as descriptors: the client pod fetches from the web pod.
        sleeper = cri.run_container(client, "sleeper", cri_containerd.image, ["sleep", "100000"])
        web_ip = cri.pod_ip(web.id)
        body = _fetch(cri, sleeper, web_ip)
        assert body.split("\r\n\r\n", 1)[-1] == "pooled\n", body
        # A pooled QEMU that dies ends the pod's tasks with 255 (it is not the shim's child).
        client_qemu = cri.container_pid(sleeper)
        os.kill(client_qemu, signal.SIGKILL)
        wait_for(lambda: cri.container_state(sleeper) == "CONTAINER_EXITED", 60,
                 "the client's container exit")
        assert cri.container_status(sleeper).status.exit_code == 255
    finally:
        for pod in pods:
            cri.remove_pod(pod.id)
    for pod in pods:
        assert cri_containerd.traces_of(pod.id) == []


def test_docker_containers_take_pooled_vms_with_dockers_network(tmp_path: Path, pool_daemon: int) -> None:
    """`docker run --runtime kata-pool`: the pooled VM's NIC serves Docker's bridge network, which
    Docker connects only after create (its prestart hook): the guest's link gets Docker's MAC and
    address, and reaches the host side of the bridge."""
    reason = daemons_unavailable()
    if reason:
        pytest.skip(reason)
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello").write_text("pooled, from the host side\n")
    before = _kata_sandboxes()
    ready = _ready()
    with temporary_netns("kdp") as ns:
        runtime = Runtime(kata_runtime_path(), ("--config", str(CONFIG)))
        with docker_daemons(runtimes={"kata-pool": runtime}, netns=ns) as docker:
            server = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "/bin/busybox", "httpd", "-f",
                                       "-p", "172.17.0.1:18082", "-h", str(www)])
            try:
                run = docker.run("run", "-d", "--name", "kp", "--runtime", "kata-pool", docker.image,
                                 "sleep", "1000", timeout=180)
                assert run.returncode == 0, run.stderr
                inspected = json.loads(docker.run("inspect", "kp", timeout=30).stdout)[0]
                qemu = int((VM_ROOT / inspected["Id"] / "qemu.pid").read_text().split()[0])
                assert qemu in ready, (qemu, ready)
                settings = inspected["NetworkSettings"]
                probe = "cat /sys/class/net/eth0/address; ip -4 -o addr show eth0"
                inside = docker.run("exec", "kp", "sh", "-c", probe, timeout=60)
                assert inside.stdout.startswith(settings["MacAddress"]), inside.stdout + inside.stderr
                assert f"{settings['IPAddress']}/16" in inside.stdout, inside.stdout
                got = docker.run("exec", "kp", "wget", "-q", "-O", "-", "http://172.17.0.1:18082/hello",
                                 timeout=60)
                assert got.stdout == "pooled, from the host side\n", got.stderr
                # --network none: the namespace has no interface at start, so the pooled NIC is
                # given back (its tap deleted there, without an endpoint scan) and the guest lets go.
                ready = _ready()
                run = docker.run("run", "-d", "--name", "kn", "--network", "none", "--runtime", "kata-pool",
                                 docker.image, "sleep", "1000", timeout=180)
                assert run.returncode == 0, run.stderr
                inspected = json.loads(docker.run("inspect", "kn", timeout=30).stdout)[0]
                assert int((VM_ROOT / inspected["Id"] / "qemu.pid").read_text().split()[0]) in ready
                monitor = inspected["State"]["Pid"]
                links = in_netns(f"/proc/{monitor}/ns/net", "ip", "-o", "link", "show").stdout
                assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"], links

                def guest_links() -> list[str]:
                    return docker.run("exec", "kn", "ls", "/sys/class/net", timeout=60).stdout.split()

                wait_for(lambda: "eth0" not in guest_links(), 30, "the unused pooled NIC gone")
            finally:
                docker.run("rm", "-f", "kp", "kn", timeout=120)
                server.terminate()
                server.wait(timeout=10)
        _fail_on_leftovers(docker, docker.containerd, kata_before=before)
