"""Configuration of containerd's CRI plugin for tests: runtime handlers, the pause image and CNI.

Everything the plugin writes goes under the daemon's directory: its root and state (containerd's, which the
plugin nests its own under), the pods' network namespaces (``netns_mounts_under_state_dir``; by default
they would be bind mounts in /var/run/netns), the CNI configuration, host-local's address leases, and runc's
state (the runc handler's ``Root``). What stays outside: the shims' sockets (/run/containerd/s), libcni's
result cache (/var/lib/cni/results/NETWORK-*, removed at each pod's teardown) and the pods' cgroups.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.images import PAUSE_REF

CRI_PLUGIN = "io.containerd.grpc.v1.cri"
CRI_NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin keeps its images and containers in
CNI_BIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins
CNI_CACHE_DIR = Path("/var/lib/cni/results")  # libcni's default, which containerd 1.6 does not change
DEFAULT_POD_SUBNET = "10.88.0.0/24"

OptionValue = str | bool | int


@dataclass(frozen=True)
class CriRuntime:
    """A runtime handler (RunPodSandbox's ``runtime_handler`` names it): the shim containerd starts and what
    the CRI plugin hands it. ``options`` is the handler's options table: runc's ``runcoptions.Options``
    (``Root``, ``BinaryName``, ...) for io.containerd.runc.v2, ``runtimeoptions.v1.Options``
    (``ConfigPath``, ``TypeUrl``) for any other shim, which gets them on stdin at ``start``."""

    runtime_type: str
    pod_annotations: tuple[str, ...] = ()  # annotation patterns passed on into the OCI spec
    container_annotations: tuple[str, ...] = ()
    options: Mapping[str, OptionValue] = field(default_factory=dict)


RUNC = CriRuntime("io.containerd.runc.v2")
LOCAL_REGISTRY = "127.0.0.1:5000"
# containerd finds containerd-shim-kata-v2 on its PATH for this type; the annotations let a pod choose
# Kata settings (io.katacontainers.config.*), as Kata's documentation configures containerd.
KATA = CriRuntime("io.containerd.kata.v2", pod_annotations=("io.katacontainers.*",))


def _runtime_table(runtime: CriRuntime) -> dict[str, Any]:
    table: dict[str, Any] = {"runtime_type": runtime.runtime_type,
                             "pod_annotations": list(runtime.pod_annotations),
                             "container_annotations": list(runtime.container_annotations)}
    if runtime.options:
        table["options"] = dict(runtime.options)
    return table


def cri_plugin_config(base: Path, runtimes: Mapping[str, CriRuntime],
                      sandbox_image: str = PAUSE_REF) -> dict[str, Any]:
    """The ``[plugins."io.containerd.grpc.v1.cri"]`` table. ``runc`` (the default handler, its state under
    ``base``) is always there; ``runtimes`` adds or replaces handlers."""
    handlers = {"runc": _runtime_table(CriRuntime(RUNC.runtime_type, options={"Root": str(base / "runc")}))}
    handlers |= {name: _runtime_table(rt) for name, rt in runtimes.items()}
    return {
        "sandbox_image": sandbox_image,
        "netns_mounts_under_state_dir": True,
        # The sandbox container asks for oom_score_adj -998, which needs CAP_SYS_RESOURCE (this host's root
        # lacks it: runc's init then dies): clamp every value to containerd's own instead.
        "restrict_oom_score_adj": True,
        # exec/attach/port-forward URLs: loopback of containerd's network namespace, any free port
        "stream_server_address": "127.0.0.1",
        "stream_server_port": "0",
        "cni": {"bin_dir": CNI_BIN_DIR, "conf_dir": str(cni_conf_dir(base)), "max_conf_num": 1},
        # the tests' local registry (tests/support/registry.py) speaks plain http on loopback
        "registry": {"mirrors": {LOCAL_REGISTRY: {"endpoint": [f"http://{LOCAL_REGISTRY}"]}}},
        "containerd": {"default_runtime_name": "runc", "snapshotter": "overlayfs", "runtimes": handlers},
    }


def cni_conf_dir(base: Path) -> Path:
    return base / "cni"


def cni_network_name(base: Path) -> str:
    """Names libcni's cache entries (CNI_CACHE_DIR/NAME-*): the daemon's directory name, unique."""
    return base.name


def cni_bridge_name(base: Path) -> str:
    """``cni-`` and the directory's random part: at most 15 characters, and distinct per daemon in case
    two share a network namespace (the host's, when no ``netns`` is given)."""
    return ("cni-" + base.name.rsplit("-", 1)[-1])[:15]


def cni_conflist(base: Path, subnet: str = DEFAULT_POD_SUBNET) -> dict[str, Any]:
    """A bridge network (the bridge is the pods' gateway, no masquerading) with host-local addresses
    kept under ``base``. Loopback is not listed: the CRI plugin adds its own loopback network (the
    ``loopback`` plugin from the same directory) to every pod."""
    bridge = {
        "type": "bridge", "bridge": cni_bridge_name(base), "isGateway": True, "ipMasq": False,
        "hairpinMode": True,
        "ipam": {"type": "host-local", "dataDir": str(base / "cni-ipam"),
                 "ranges": [[{"subnet": subnet}]], "routes": [{"dst": "0.0.0.0/0"}]},
    }
    return {"cniVersion": "0.4.0", "name": cni_network_name(base), "plugins": [bridge]}


def write_cni_config(base: Path, subnet: str = DEFAULT_POD_SUBNET) -> Path:
    conf_dir = cni_conf_dir(base)
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / "10-kata-test.conflist"
    path.write_text(json.dumps(cni_conflist(base, subnet), indent=1))
    return path
