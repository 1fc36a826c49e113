"""Where the host reaches the guest agent: the one value a hypervisor driver hands to the agent client."""

from __future__ import annotations

from typing import Literal, NamedTuple

# The vsock port the agent listens on (Kata's default).
AGENT_VSOCK_PORT = 1024
# Name of the virtio-serial port in the guest (/sys/class/virtio-ports/*/name).
AGENT_SERIAL_PORT_NAME = "agent.channel.0"


# A NamedTuple, not a dataclass: the guest agent imports this module for its constants, and
# dataclasses (with inspect) is a measurable share of the agent's start-up under TCG.
class AgentEndpoint(NamedTuple):
    """``kind == "vsock"``: connect AF_VSOCK to (cid, port).
    ``kind == "serial"``: connect AF_UNIX to ``path``, the host end of a virtio-serial port
    (QEMU listens there; one client at a time)."""

    kind: Literal["vsock", "serial"]
    path: str = ""
    cid: int = 0
    port: int = AGENT_VSOCK_PORT
