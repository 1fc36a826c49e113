"""A container inside a sandbox's VM: its shares on the host, its life in the guest through the agent."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from kata.fs_share.shared_dir import check_source
from kata.oci.spec import Bundle
from kata.specconv import MAX_SUBMOUNT_BINDS, ContainerPlan, plan_container, shared_binds, submount_binds

if TYPE_CHECKING:
    from kata.sandbox.sandbox import Sandbox

log = logging.getLogger(__name__)

# The init process of a container is addressed with an empty exec id in the agent API.
INIT_EXEC_ID = ""


def check_container(bundle: Bundle, cid: str) -> ContainerPlan:
    """What creating ``cid`` from ``bundle`` in a VM would refuse, found before a VM is booted or
    grown for it: mounts that cannot pass into a VM, bind sources that do not exist."""
    plan = plan_container(bundle, cid)
    for share in plan.shares[1:]:  # shares[0] is the rootfs, which load_bundle found
        check_source(share)
    return plan


class Container:
    def __init__(self, sandbox: Sandbox, cid: str, bundle: Bundle) -> None:
        self.sandbox = sandbox
        self.id = cid
        self.bundle = bundle
        self.plan: ContainerPlan = plan_container(bundle, cid)
        self.terminal = bool(bundle.spec.get("process", {}).get("terminal", False))

    def create(self) -> None:
        from kata.oci.seccomp_bpf import with_compiled_seccomp  # ctypes: only where a container is made

        spec = self.plan.guest_spec
        for destination in shared_binds(spec):
            log.warning(f"container {self.id}: mount {destination} is shared one way only: the host's mounts "
                        "below it come in, mounts made in the VM never reach the host")
        for share in self.plan.shares:
            self.sandbox.shared.add(share)
            if share.read_only_at_top:
                found = self.sandbox.shared.submounts(share.name)
                if len(found) > MAX_SUBMOUNT_BINDS:
                    log.warning(f"container {self.id}: {share.source} has {len(found)} mounts below it; the "
                                f"ones after the first {MAX_SUBMOUNT_BINDS} are read-only in the container")
                spec = submount_binds(spec, share, found)
        # Compiled here, natively: crun would compile the profile in the guest, under emulation on TCG.
        spec = with_compiled_seccomp(spec)
        agent = self.sandbox.require_agent()
        agent.create_container(container_id=self.id, exec_id=INIT_EXEC_ID,
                               oci_spec_json=json.dumps(spec).encode(),
                               pod_sysctls=self.plan.pod_sysctls)
        self.sandbox.containers[self.id] = self
        self.sandbox.timings.mark("container_created")

    # Starting, signalling and waiting go through the container's monitor (kata.runc.monitor), which
    # holds the agent connection from `create` on.

    def remove(self) -> None:
        self.sandbox.require_agent().remove_container(container_id=self.id)
        self.sandbox.shared.remove(self.id)
        self.sandbox.containers.pop(self.id, None)
