"""A container inside a sandbox's VM: its shares on the host, its life in the guest through the agent."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from kata.fs_share.shared_dir import check_source
from kata.oci.spec import Bundle
from kata.specconv import ContainerPlan, plan_container

if TYPE_CHECKING:
    from kata.sandbox.sandbox import Sandbox

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
        for share in self.plan.shares:
            self.sandbox.shared.add(share)
        agent = self.sandbox.require_agent()
        agent.create_container(container_id=self.id, exec_id=INIT_EXEC_ID,
                               oci_spec_json=json.dumps(self.plan.guest_spec).encode(),
                               pod_sysctls=self.plan.pod_sysctls)
        self.sandbox.containers[self.id] = self
        self.sandbox.timings.mark("container_created")

    # Starting, signalling and waiting go through the container's monitor (kata.runc.monitor), which
    # holds the agent connection from `create` on.

    def remove(self) -> None:
        self.sandbox.require_agent().remove_container(container_id=self.id)
        self.sandbox.shared.remove(self.id)
        self.sandbox.containers.pop(self.id, None)
