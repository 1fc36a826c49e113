"""Where a pod's shim listens, and how a container finds its pod's shim.

As containerd's own shims do, the socket's name is a hash of containerd's address, the namespace
and the pod's id: every container of a pod (the CRI sandbox-id annotation) computes the same one.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

from kata.errors import KataError
from kata.oci.cri_annotations import CONTAINER_TYPE, SANDBOX_ID
from kata.utils.files import read_regular_file
from kata.utils.ids import id_problem

SOCKET_DIR = Path("/run/containerd/s")


def socket_path(containerd_address: str, namespace: str, group_id: str) -> Path:
    digest = hashlib.sha256(os.path.join(containerd_address, namespace, group_id).encode()).hexdigest()
    return SOCKET_DIR / digest


def as_address(path: Path) -> str:
    return f"unix://{path}"


def group_of(bundle: Path, task_id: str) -> str:
    """The pod a task belongs to: its sandbox for a CRI container, else the task itself."""
    try:
        spec = json.loads(read_regular_file(bundle / "config.json"))
    except (OSError, ValueError, RecursionError) as exc:
        raise KataError(f"{bundle / 'config.json'}: {exc}") from exc
    annotations = spec.get("annotations") or {} if isinstance(spec, dict) else {}
    if not isinstance(annotations, dict):
        raise KataError(f"{bundle / 'config.json'}: annotations must be an object")
    sandbox_id = annotations.get(CONTAINER_TYPE) == "container" and annotations.get(SANDBOX_ID)
    if sandbox_id:
        problem = id_problem(sandbox_id) if isinstance(sandbox_id, str) else "must be a string"
        if problem:
            raise KataError(f"annotation {SANDBOX_ID}: {problem}")
        return str(sandbox_id)
    return task_id


def is_serving(path: Path) -> bool:
    """Whether a shim accepts connections on ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        sock.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()
