"""The container's network namespace mirrored into its VM at start: a tap per interface with tc
mirroring, a hot-added virtio-net device with the interface's MAC, and the guest configured alike."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import leftovers, runtime_bin
from tests.support.bundles import make_busybox_bundle
from tests.support.netns import in_netns, temporary_netns

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("needs_guest")]

TIMEOUT = 120


@pytest.fixture
def netns() -> Iterator[str]:
    with temporary_netns("kt") as name:
        yield name
    assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.fixture
def peer_netns() -> Iterator[str]:
    with temporary_netns("kp") as name:
        yield name


@pytest.mark.parametrize("vcpus", [1, 2])
def test_the_namespace_is_mirrored_into_the_vm_at_start(tmp_path: Path, netns: str, peer_netns: str,
                                                        cid: str, vcpus: int) -> None:
    """A veth in the container's namespace (its peer in another, as a bridge would be): at start the
    VM gets an interface with its MAC, addresses and routes (and a queue pair per vCPU), traffic flows
    both ways through the tc mirroring, and delete leaves the namespace as it found it."""
    in_netns(netns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "kpeer")
    in_netns(netns, "ip", "link", "set", "kpeer", "netns", f"/run/netns/{peer_netns}")
    in_netns(netns, "ip", "addr", "add", "10.88.0.2/24", "dev", "eth0")
    in_netns(netns, "ip", "link", "set", "eth0", "up")
    in_netns(netns, "ip", "route", "add", "default", "via", "10.88.0.1")
    in_netns(peer_netns, "ip", "addr", "add", "10.88.0.1/24", "dev", "kpeer")
    in_netns(peer_netns, "ip", "link", "set", "kpeer", "up")
    mac = in_netns(netns, "ip", "-o", "link", "show", "eth0").stdout.split("link/ether ")[1].split()[0]

    bundle = make_busybox_bundle(tmp_path / "b", ["sleep", "1000"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
    spec["linux"]["namespaces"].append({"type": "network", "path": f"/run/netns/{netns}"})
    if vcpus > 1:  # a CPU quota adds vCPUs over the default one
        spec["linux"]["resources"] = {"cpu": {"quota": 100000 * (vcpus - 1), "period": 100000}}
    (bundle / "config.json").write_text(json.dumps(spec))
    cli = [runtime_bin(), "--root", str(tmp_path / "root")]
    with open(tmp_path / "out", "wb") as out:
        subprocess.run([*cli, "create", "--bundle", str(bundle), cid], check=True, stdout=out, stderr=out,
                       stdin=subprocess.DEVNULL, timeout=TIMEOUT)
    try:
        started = subprocess.run([*cli, "start", cid], capture_output=True, text=True, timeout=TIMEOUT)
        assert started.returncode == 0, started.stderr
        queues = subprocess.run([*cli, "exec", cid, "ls", "/sys/class/net/eth0/queues"], capture_output=True,
                                text=True, timeout=TIMEOUT).stdout.split()
        assert sorted(q for q in queues if q.startswith("rx-")) == [f"rx-{i}" for i in range(vcpus)], queues
        probe = "cat /sys/class/net/eth0/address; ip -4 addr show eth0; ip route"
        inside = subprocess.run([*cli, "exec", cid, "sh", "-c", probe], capture_output=True, text=True,
                                timeout=TIMEOUT)
        assert inside.stdout.startswith(mac), inside.stdout + inside.stderr
        assert "10.88.0.2/24" in inside.stdout and "default via 10.88.0.1" in inside.stdout
        ping = in_netns(peer_netns, "/bin/busybox", "ping", "-c", "2", "-W", "10", "10.88.0.2", check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        out_ping = subprocess.run([*cli, "exec", cid, "ping", "-c", "2", "-W", "10", "10.88.0.1"],
                                  capture_output=True, text=True, timeout=TIMEOUT)
        assert out_ping.returncode == 0, out_ping.stdout + out_ping.stderr
    finally:
        subprocess.run([*cli, "delete", "--force", cid], capture_output=True, timeout=TIMEOUT)
    assert leftovers(cid) == []
    links = in_netns(netns, "ip", "-o", "link").stdout
    assert "tap0_kata" not in links and "eth0" in links
    assert in_netns(netns, "tc", "qdisc", "show", "dev", "eth0", "ingress").stdout.strip() == ""


@pytest.mark.parametrize("network", [None, "/proc/self/ns/net"])
def test_host_networking_is_refused_clearly(tmp_path: Path, cid: str, network: str | None) -> None:
    """No network namespace, or the runtime's own (Docker's --net=host names it by path)."""
    bundle = make_busybox_bundle(tmp_path / "b", ["true"])
    spec = json.loads((bundle / "config.json").read_text())
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "network"]
    if network:
        spec["linux"]["namespaces"].append({"type": "network", "path": network})
    (bundle / "config.json").write_text(json.dumps(spec))
    proc = subprocess.run([runtime_bin(), "--root", str(tmp_path / "root"), "create", "--bundle", str(bundle),
                           cid], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=TIMEOUT)
    assert proc.returncode != 0 and "host networking is not supported" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and leftovers(cid) == []
