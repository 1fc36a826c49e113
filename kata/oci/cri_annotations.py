"""The annotations that tell a pod's containers apart: containerd's CRI plugin's (the Kubernetes names)
and CRI-O's, which podman also puts on the containers of a `podman pod` (naming the pod's infra
container as their sandbox). Kata reads both sets, and so do we.

A module of its own, so that the shim's `start` and `delete` commands read them without loading
the spec translator.
"""

from collections.abc import Mapping

CONTAINER_TYPE = "io.kubernetes.cri.container-type"  # "sandbox" or "container"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
SANDBOX_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
SANDBOX_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"
SANDBOX_MEMORY = "io.kubernetes.cri.sandbox-memory"  # bytes
SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"  # the pod's Kubernetes uid, name and namespace
SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"

CRIO_CONTAINER_TYPE = "io.kubernetes.cri-o.ContainerType"  # "sandbox" or "container"
CRIO_SANDBOX_ID = "io.kubernetes.cri-o.SandboxID"


def pod_keys(annotations: Mapping[str, object]) -> tuple[str, str]:
    """The (container type, sandbox id) annotation names a spec uses: containerd's, or CRI-O's
    when only those are there."""
    if CONTAINER_TYPE not in annotations and CRIO_CONTAINER_TYPE in annotations:
        return CRIO_CONTAINER_TYPE, CRIO_SANDBOX_ID
    return CONTAINER_TYPE, SANDBOX_ID
