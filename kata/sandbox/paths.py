"""Where a sandbox keeps its things on the host, following Kata's layout under /run."""

from __future__ import annotations

import os
from pathlib import Path

from kata.errors import KataError
from kata.utils.ids import MAX_ID_LENGTH, id_problem, shown

# Kata's locations: persisted sandbox state under /run/vc/sbs, VMM sockets under /run/vc/vm,
# and the directory shared into the guest under /run/kata-containers/shared/sandboxes.
STATE_ROOT = Path(os.environ.get("KATA_STATE_ROOT", "/run/vc"))
SHARED_ROOT = Path(os.environ.get("KATA_SHARED_ROOT", "/run/kata-containers/shared/sandboxes"))
VM_ROOT = STATE_ROOT / "vm"
# Template VMs run here while they are made (kata.factory.template): a directory no sandbox id can
# name, unlike VM_ROOT/<anything>, and short, since their sockets live in it.
TEMPLATE_VM_ROOT = STATE_ROOT / "template-vm"
# The warm pool's clones run here (kata.factory.pool) until one is renamed to VM_ROOT/<sid>: on the
# same filesystem, so that the rename is atomic.
POOL_ROOT = STATE_ROOT / "pool"
# And their shared directories, each renamed to SHARED_ROOT/<sid> with its VM: beside SHARED_ROOT
# (same filesystem), never in it, where a sandbox id could name one.
POOL_SHARES_ROOT = SHARED_ROOT.parent / "pool"

# Every unix socket in a sandbox's VM directory (QEMU's QMP and agent ports, virtiofsd's, the init
# monitor's agent proxy, the debug console's port): their paths, with the id in them, must fit in sun_path.
VIRTIOFSD_SOCKET = "vhost-fs.sock"
VM_SOCKETS = ("qmp.sock", "agent.sock", "console.sock", VIRTIOFSD_SOCKET, "agent-proxy.sock")
# sun_path is 108 bytes, the terminating NUL included.
SOCKET_PATH_MAX = 107


POD_RECORD_NAME = "pod.json"

class InvalidIdError(KataError, ValueError):
    pass


def validate_id(id_: str) -> str:
    """runc's rule for ids (see kata.utils.ids): also keeps ids safe to use as path components."""
    problem = id_problem(id_)
    if problem:
        raise InvalidIdError(problem)
    return id_


def max_sandbox_id_length() -> int:
    """The longest sandbox id whose VM sockets (VM_ROOT/<id>/<socket>) still fit in sun_path: 79
    characters under the default /run/vc, fewer where KATA_STATE_ROOT is longer."""
    longest = max(len(name) for name in VM_SOCKETS)
    slashes = 2  # VM_ROOT/<id>/<socket>
    return min(MAX_ID_LENGTH, SOCKET_PATH_MAX - len(os.fsencode(VM_ROOT)) - slashes - longest)


def validate_sandbox_id(id_: str) -> str:
    """An id a sandbox (a VM) can have: a valid id, short enough for its sockets' paths."""
    validate_id(id_)
    limit = max_sandbox_id_length()
    if limit < 1:  # no id would do: the state root is to blame
        raise KataError(f"KATA_STATE_ROOT {STATE_ROOT} is too long: a VM's socket paths under it would "
                        "not fit in 108 bytes")
    if len(id_) > limit:
        raise InvalidIdError(f"invalid id format: {shown(id_)}: longer than {limit} characters, the most "
                             f"that keeps its VM's socket paths under {VM_ROOT} within 108 bytes")
    return id_


def has_state(sid: str) -> bool:
    """Whether sandbox ``sid`` has state on the host (what a teardown looks for): a stat, so that the
    commands run after every clean exit need not load the sandbox service to find nothing."""
    return SandboxPaths(sid).state_dir.exists()


class SandboxPaths:
    """A sandbox's directories; the id is checked here, so that no path is ever built from an
    unchecked one, whoever the caller. (No dataclass: the commands containerd runs after every
    container load this module, and dataclasses would cost each of them 5 ms.)"""

    __slots__ = ("id",)

    def __init__(self, id: str) -> None:  # noqa: A002 - the sandbox's id, as everywhere
        self.id = validate_sandbox_id(id)

    def __repr__(self) -> str:
        return f"SandboxPaths({self.id!r})"

    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / "sbs" / self.id

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def pod_record(self) -> Path:
        """What kata.sandbox.pod records of the pod (its configuration, namespace, cgroups, limits)."""
        return self.state_dir / POD_RECORD_NAME

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "lock"

    @property
    def metrics_socket(self) -> Path:
        """Where the process that serves the sandbox (the shim, or the runc path's init monitor) serves
        its Prometheus text (kata.metrics); its path is shorter than the VM sockets'."""
        return self.state_dir / "metrics.sock"

    @property
    def vm_dir(self) -> Path:
        return VM_ROOT / self.id

    @property
    def virtiofsd_socket(self) -> Path:
        return self.vm_dir / VIRTIOFSD_SOCKET

    @property
    def agent_proxy_socket(self) -> Path:
        """Where the container's init monitor serves the agent to later commands (kata-runtime)."""
        return self.vm_dir / "agent-proxy.sock"

    @property
    def shared_base(self) -> Path:
        return SHARED_ROOT / self.id

    @property
    def mounts_dir(self) -> Path:
        """Where the host mounts containers' rootfs and volumes: never exported to the guest."""
        return self.shared_base / "mounts"

    @property
    def shared_dir(self) -> Path:
        """The directory exported to the guest: a read-only view of mounts_dir that receives its mounts."""
        return self.shared_base / "shared"

    def all_dirs(self) -> tuple[Path, ...]:
        """In the order they are made; a teardown removes them in reverse, the state last: as long as
        anything else is left, the state says so to whoever finishes a teardown killed half-way
        (containerd's `shim delete` looks for it, and only for it)."""
        return (self.state_dir, self.vm_dir, self.shared_base)
