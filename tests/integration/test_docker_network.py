"""Docker's default bridge with `--runtime kata`: dockerd runs in a network namespace the test makes,
and the VM container gets Docker's IP and MAC, reaches a server on the host side, and serves a
published port."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import _fail_on_leftovers, _kata_sandboxes, daemons_unavailable
from tests.support.daemons import Dockerd, Runtime, docker_daemons, kata_runtime_path
from tests.support.netns import in_netns, temporary_netns

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("needs_guest")]

TIMEOUT = 180


@pytest.fixture(scope="module")
def bridged() -> Iterator[tuple[Dockerd, str]]:
    reason = daemons_unavailable()
    if reason:
        pytest.skip(reason)
    before = _kata_sandboxes()
    with temporary_netns("kd") as ns:
        with docker_daemons(runtimes={"kata": Runtime(kata_runtime_path(), ())}, netns=ns) as dockerd:
            yield dockerd, ns
        _fail_on_leftovers(dockerd, dockerd.containerd, kata_before=before)


def test_container_has_dockers_address_and_reaches_the_host_side(bridged: tuple[Dockerd, str],
                                                                  tmp_path: Path) -> None:
    docker, ns = bridged
    # A server on the host side of the bridge (docker0's address in dockerd's namespace).
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello").write_text("from the host side\n")
    server = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", "/bin/busybox", "httpd", "-f",
                               "-p", "172.17.0.1:18081", "-h", str(www)])
    run = docker.run("run", "-d", "--name", "kn", "-p", "18080:8080", "--runtime", "kata", docker.image,
                     "httpd", "-f", "-p", "8080", "-h", "/etc", timeout=TIMEOUT)
    try:
        assert run.returncode == 0, run.stderr
        settings = json.loads(docker.run("inspect", "kn", timeout=30).stdout)[0]["NetworkSettings"]
        ip, mac = settings["IPAddress"], settings["MacAddress"]
        probe = "cat /sys/class/net/eth0/address; ip -4 -o addr show eth0"
        inside = docker.run("exec", "kn", "sh", "-c", probe, timeout=TIMEOUT)
        assert inside.stdout.startswith(mac) and f"{ip}/16" in inside.stdout, inside.stdout + inside.stderr
        # The container reaches the host side...
        got = docker.run("exec", "kn", "wget", "-q", "-O", "-", "http://172.17.0.1:18081/hello",
                         timeout=TIMEOUT)
        assert got.stdout == "from the host side\n", got.stderr
        # ...and the host side reaches the published port (Docker's proxy, then the VM).
        deadline = time.monotonic() + 30
        while True:
            fetched = in_netns(ns, "/bin/busybox", "wget", "-q", "-O", "-", "http://127.0.0.1:18080/passwd",
                            check=False)
            if fetched.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert fetched.stdout.startswith("root:"), fetched.stderr
    finally:
        server.kill()
        server.wait()
        docker.run("rm", "-f", "kn", timeout=TIMEOUT)


# A one-name DNS server: answers A queries for NAME with ADDRESS, and NXDOMAIN otherwise.
DNS_SERVER = """
import socket, struct, sys
name, address = sys.argv[1].encode(), socket.inet_aton(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("172.17.0.1", 53))
while True:
    q, peer = s.recvfrom(512)
    labels, i = [], 12
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]]); i += 1 + q[i]
    question = q[12:i + 5]
    qtype = struct.unpack("!H", q[i + 1:i + 3])[0]
    known = b".".join(labels).lower() == name
    found = known and qtype == 1
    flags = 0x8180 if known else 0x8183  # the name exists (with no AAAA), or NXDOMAIN
    head = q[:2] + struct.pack("!HHHHH", flags, 1, 1 if found else 0, 0, 0)
    answer = (b"\\xc0\\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + address) if found else b""
    s.sendto(head + question + answer, peer)
"""


def test_names_resolve_through_dockers_resolv_conf(bridged: tuple[Dockerd, str]) -> None:
    import sys

    docker, ns = bridged
    server = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c", DNS_SERVER,
                               "kata-test.example", "10.1.2.3"])
    try:
        proc = docker.run("run", "--rm", "--dns", "172.17.0.1", "--runtime", "kata", docker.image, "sh", "-c",
                          "cat /etc/resolv.conf; nslookup kata-test.example", timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "nameserver 172.17.0.1" in proc.stdout and "10.1.2.3" in proc.stdout, proc.stdout
    finally:
        server.kill()
        server.wait()
