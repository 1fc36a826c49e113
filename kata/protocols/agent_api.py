"""What both ends of the agent channel agree on, and the hypervisor that wires it: the agent's
services, its long-poll methods, the virtio-serial port's name and the vsock port, and the endpoint
a hypervisor driver hands to the agent client. Cheap to import: the guest agent loads it."""

from __future__ import annotations

from typing import Literal, NamedTuple

# The vsock port the agent listens on (Kata's default).
AGENT_VSOCK_PORT = 1024
# Name of the virtio-serial port in the guest (/sys/class/virtio-ports/*/name).
AGENT_SERIAL_PORT_NAME = "agent.channel.0"
# Kernel parameter: "off" runs the agent's helpers at fixed addresses (kata.guest.agent.layout).
HELPER_ASLR_PARAM = "agent.helper_aslr"

# The agent's ttrpc services.
AGENT_SERVICE = "grpc.AgentService"
HEALTH_SERVICE = "grpc.Health"
# The agent's long-poll methods: each waits as long as a process or its streams take (an exit, output,
# room in a stdin nobody reads, an OOM kill, a forwarded connection's next bytes or room for them).
# The agent serves each such call on a thread of its own, clients call them without a deadline, and
# every other call gets one (the monitor's proxy included).
LONG_POLL_METHODS = frozenset({"WaitProcess", "ReadStdout", "ReadStderr", "WriteStdin", "GetOOMEvent",
                               "PortForwardRead", "PortForwardWrite"})


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
