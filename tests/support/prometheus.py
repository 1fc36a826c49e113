"""A private Prometheus server (Debian's /usr/bin/prometheus) and kata-monitor, for the metrics tests.

    with kata_monitor() as monitor, prometheus_server([monitor.address]) as prom:
        prom.query('kata_guest_meminfo{item="mem_total"}')   # the series of the instant vector

Both listen on free ports of 127.0.0.1; Prometheus keeps its database and configuration in a temporary
directory that goes with it. Both are ended (SIGTERM, then SIGKILL) when their block ends.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMETHEUS = "/usr/bin/prometheus"
_START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kata_monitor_command() -> list[str]:
    """The installed `kata-monitor` where setup put it on PATH (or in the venv), else its module in this
    interpreter: the same code either way (PYTHONPATH, when set, decides which kata package runs)."""
    found = shutil.which("kata-monitor") or shutil.which("kata-monitor", path=str(Path(sys.prefix) / "bin"))
    return [found] if found else [sys.executable, "-m", "kata.metrics.kata_monitor"]


def get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return int(reply.status), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            if get(url, timeout=2.0)[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer {url} within {_START_TIMEOUT:g}s")
        time.sleep(0.1)


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class Monitor:
    address: str  # HOST:PORT
    proc: subprocess.Popen[bytes]

    def get(self, path: str) -> tuple[int, str]:
        return get(f"http://{self.address}{path}")


@contextmanager
def kata_monitor(scrape_timeout: float = 0.8, log: Path | None = None) -> Iterator[Monitor]:
    address = f"127.0.0.1:{free_port()}"
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen([*kata_monitor_command(), "--listen-address", address,
                             "--scrape-timeout", str(scrape_timeout)], stdout=out, stderr=out)
    try:
        _wait_http(f"http://{address}/sandboxes", proc, "kata-monitor")
        yield Monitor(address, proc)
    finally:
        _end(proc)
        if log is not None and not isinstance(out, int):
            out.close()


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of ``expr`` now: [{"metric": {labels}, "value": [time, "value"]}, ...]."""
        status, body = get(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
        reply = json.loads(body)
        if status != 200 or reply.get("status") != "success":
            raise RuntimeError(f"query {expr!r}: {status} {body[:200]}")
        return list(reply["data"]["result"])

    def targets_up(self) -> list[str]:
        return [r["metric"].get("instance", "") for r in self.query("up == 1")]


@contextmanager
def prometheus_server(targets: list[str], interval: str = "1s") -> Iterator[Prometheus]:
    with tempfile.TemporaryDirectory(prefix="kata-prometheus-") as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {interval}\n"
            f"  scrape_timeout: {interval}\n"
            "scrape_configs:\n"
            "  - job_name: kata\n"
            f"    static_configs: [{{targets: {json.dumps(targets)}}}]\n")
        address = f"127.0.0.1:{free_port()}"
        with open(Path(tmp) / "prometheus.log", "wb") as log:
            proc = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp}/data",
                                     f"--web.listen-address={address}", "--storage.tsdb.retention.time=1h"],
                                    stdout=log, stderr=log)
        try:
            _wait_http(f"http://{address}/-/ready", proc, "prometheus")
            yield Prometheus(f"http://{address}", proc)
        finally:
            _end(proc)
