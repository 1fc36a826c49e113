"""The annotations containerd's CRI plugin puts in a pod's OCI specs (the Kubernetes names).

A module of its own, so that the shim's `start` and `delete` commands read them without loading
the spec translator.
"""

CONTAINER_TYPE = "io.kubernetes.cri.container-type"  # "sandbox" or "container"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
SANDBOX_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
SANDBOX_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"
SANDBOX_MEMORY = "io.kubernetes.cri.sandbox-memory"  # bytes
SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"  # the pod's Kubernetes uid, name and namespace
SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
