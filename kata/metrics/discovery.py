"""The sandboxes running on this host, of both front ends: each serves its metrics on a socket in its
state directory (/run/vc/sbs/<id>/metrics.sock). A pod made through containerd's CRI keeps the CRI's
annotations in its record (pod.json), which name it as Kubernetes does."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kata.oci import cri_annotations as cri
from kata.sandbox.paths import STATE_ROOT, SandboxPaths, validate_sandbox_id

# The pod's annotations (of its sandbox container) that label its series, by label.
CRI_LABELS = {"cri_uid": cri.SANDBOX_UID, "cri_name": cri.SANDBOX_NAME,
              "cri_namespace": cri.SANDBOX_NAMESPACE}
# A label value from a record: the CRI's names are short (Kubernetes allows 253 characters).
_MAX_LABEL = 253


@dataclass(frozen=True)
class Found:
    id: str
    socket: Path
    labels: dict[str, str] = field(default_factory=dict)  # sandbox_id, and the CRI's where known


def running_sandboxes(root: Path | None = None) -> list[Found]:
    """Every sandbox directory with a metrics socket, sorted by id."""
    base = (root or STATE_ROOT) / "sbs"
    try:
        names = sorted(p.name for p in base.iterdir())
    except OSError:
        return []
    found = []
    for name in names:
        try:
            validate_sandbox_id(name)
        except ValueError:
            continue  # not a sandbox's directory
        socket = base / name / SandboxPaths(name).metrics_socket.name
        if socket.exists():
            found.append(Found(name, socket, {"sandbox_id": name, **cri_labels(base / name)}))
    return found


def cri_labels(state_dir: Path) -> dict[str, str]:
    """cri_uid, cri_name and cri_namespace from the pod's record, where the CRI made it."""
    from kata.sandbox.paths import POD_RECORD_NAME
    from kata.sandbox.pod import PodRecord

    try:
        annotations = PodRecord.load(state_dir / POD_RECORD_NAME).annotations
    except (OSError, ValueError, TypeError):
        return {}  # no record (yet), or not one we read: the sandbox id labels it alone
    return {label: str(annotations[key])[:_MAX_LABEL] for label, key in CRI_LABELS.items()
            if isinstance(annotations, dict) and annotations.get(key)}
