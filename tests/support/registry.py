"""A local image registry (Debian's docker-registry) on 127.0.0.1 inside a test's network namespace,
so that containerd pulls images through the CRI's PullImage as a kubelet would. No registry on the
network is used: the busybox image the tests build is pushed to it with skopeo."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.cri_config import LOCAL_REGISTRY
from tests.support.netns import NETNS_DIR, call_in_netns, in_netns

REGISTRY_BIN = "/usr/bin/docker-registry"
ADDRESS = LOCAL_REGISTRY  # containerd's CRI config maps it to plain http
PORT = int(ADDRESS.rsplit(":", 1)[1])
_CONFIG = """version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
http:
  addr: {address}
"""


def _answers(netns: str) -> bool:
    def connect() -> bool:
        try:
            socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
            return True
        except OSError:
            return False

    return call_in_netns(netns, connect)


@contextmanager
def local_registry(netns: str, work: Path, timeout: float = 30.0) -> Iterator[str]:
    """The registry's address (host:port), serving until the block ends; its storage is under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / "registry.yml"
    config.write_text(_CONFIG.format(root=work / "storage", address=ADDRESS))
    with open(work / "registry.log", "wb") as log:
        proc = subprocess.Popen(["nsenter", f"--net={NETNS_DIR}/{netns}", REGISTRY_BIN, "serve", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _answers(netns):
            if proc.poll() is not None or time.monotonic() > deadline:
                log_tail = (work / "registry.log").read_text()[-500:]
                raise RuntimeError(f"docker-registry did not start: {log_tail}")
            time.sleep(0.1)
        yield ADDRESS
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def push(netns: str, oci_archive: Path, ref: str) -> None:
    """Copy an OCI archive's image to ``ref`` (ADDRESS/name:tag) in the namespace's registry."""
    proc = in_netns(netns, "skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                    f"oci-archive:{oci_archive}", f"docker://{ref}", check=False, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"skopeo copy to {ref} failed: {proc.stderr.strip()[-500:]}")
