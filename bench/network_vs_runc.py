#!/usr/bin/env python3
"""TCP throughput and connection latency between the host side of Docker's default bridge and a
container, with kata-runtime and with runc, in one run (dockerd runs in a network namespace this
script makes, as the tests do):

- host side -> container and container -> host side: bytes moved in a fixed time over one TCP
  connection (the container end is busybox `nc`, the host end a Python socket);
- connection latency: a TCP connect plus a one-byte answer from busybox httpd, median of N.

    python bench/network_vs_runc.py [--seconds S] [--connects N] [--json FILE]

Prints a table with kata/runc ratios (target of the networking issue: throughput >= 0.3 of runc's),
then one JSON line. Figures are from a noisy 2-core machine under TCG: read them as orders of magnitude.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import emit  # noqa: E402
from tests.support.daemons import Dockerd, Runtime, docker_daemons, kata_runtime_path  # noqa: E402
from tests.support.netns import call_in_netns, temporary_netns  # noqa: E402

PORT_IN, PORT_OUT, PORT_HTTP = 5001, 5002, 8080
HOST_SIDE = "172.17.0.1"
TARGET_THROUGHPUT_RATIO = 0.3


def container_ip(d: Dockerd, name: str) -> str:
    return str(json.loads(d.run("inspect", name, timeout=30).stdout)[0]["NetworkSettings"]["IPAddress"])


def connect_retry(addr: tuple[str, int], timeout: float = 60.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(addr, timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def send_for(sock: socket.socket, seconds: float) -> int:
    chunk = b"\0" * 65536
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sent += sock.send(chunk)
    sock.close()
    return sent


def receive_for(server: socket.socket, seconds: float, result: dict[str, float]) -> None:
    conn, _ = server.accept()
    got = 0
    start = time.monotonic()
    conn.settimeout(1.0)
    while time.monotonic() - start < seconds:
        try:
            data = conn.recv(262144)
        except TimeoutError:
            continue
        if not data:
            break
        got += len(data)
    result["mbit"] = got * 8 / (time.monotonic() - start) / 1e6
    conn.close()


def measure(d: Dockerd, runtime: str, seconds: float, connects: int) -> dict[str, Any]:
    name = f"bn-{runtime}-{uuid.uuid4().hex[:6]}"
    out: dict[str, Any] = {}
    # host side -> container: nc in the container swallows what we send for `seconds`.
    d.run("run", "-d", "--name", name, "--runtime", runtime, d.image, "sh", "-c",
          f"nc -l -p {PORT_IN} > /dev/null; httpd -f -p {PORT_HTTP} -h /etc", timeout=180)
    try:
        ip = container_ip(d, name)
        sock = connect_retry((ip, PORT_IN))
        out["in_mbit"] = send_for(sock, seconds) * 8 / seconds / 1e6
        # connection latency against httpd, once nc has exited
        times = []
        for _ in range(connects):
            t0 = time.monotonic()
            with connect_retry((ip, PORT_HTTP)) as c:
                c.sendall(b"GET /passwd HTTP/1.0\r\n\r\n")
                c.recv(1)
            times.append(time.monotonic() - t0)
        out["connect_ms"] = statistics.median(times[1:] or times) * 1000
    finally:
        d.run("rm", "-f", name, timeout=180)
    # container -> host side: the container streams zeros to us for `seconds`.
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((HOST_SIDE, PORT_OUT))
    server.listen(1)
    result: dict[str, float] = {}
    receiver = threading.Thread(target=receive_for, args=(server, seconds, result))
    receiver.start()
    try:
        d.run("run", "--rm", "--runtime", runtime, d.image, "sh", "-c",
              f"nc {HOST_SIDE} {PORT_OUT} < /dev/zero", timeout=180)
    finally:
        receiver.join(seconds + 60)
        server.close()
    out["out_mbit"] = result.get("mbit", 0.0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--connects", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with temporary_netns("kb") as ns, \
            docker_daemons(runtimes={"kata": Runtime(kata_runtime_path(), ())}, netns=ns) as d:
        # Our sockets on the host side of the bridge, from a thread that stays there.
        results = call_in_netns(ns, lambda: {rt: measure(d, rt, args.seconds, args.connects)
                                            for rt in ("runc", "kata")})
    runc, kata = results["runc"], results["kata"]
    print(f"{'':32}{'runc':>10}{'kata':>10}{'kata/runc':>11}  target")
    for key, label in (("in_mbit", "host -> container (Mbit/s)"), ("out_mbit", "container -> host (Mbit/s)")):
        ratio = kata[key] / runc[key] if runc[key] else 0.0
        print(f"{label:32}{runc[key]:10.0f}{kata[key]:10.0f}{ratio:10.2f}x  >= {TARGET_THROUGHPUT_RATIO}")
    print(f"{'connect + first byte (ms)':32}{runc['connect_ms']:10.2f}{kata['connect_ms']:10.2f}"
          f"{kata['connect_ms'] / runc['connect_ms']:10.1f}x")
    line = {"bench": "network_vs_runc", "seconds": args.seconds, **results}
    emit(line, Path(args.json) if args.json else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
