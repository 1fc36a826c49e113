"""`kata-runtime spec`: write runc's example config.json into a bundle, as `runc spec` does.

The example is runc 1.1's specconv.Example(), built on kata.oci.default_spec (which has Docker's
defaults) so that both stay one shape; `--rootless` applies runc's specconv.ToRootless(). The
cgroup namespace is included as runc includes it on a cgroup v2 host: containers run in the guest,
which is cgroup v2 only.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
from pathlib import Path
from typing import Any

from kata.errors import KataError
from kata.oci.default_spec import default_spec

SPEC_CONFIG = "config.json"

# runc's example runs a shell with the capabilities a shell needs and no more.
_EXAMPLE_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
_EXAMPLE_MASKED = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
]
_EXAMPLE_READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


class SpecError(KataError):
    """`spec` cannot write the file; one line, worded like runc."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("spec", help="create a new specification file")
    p.add_argument("--bundle", "-b", default="", help="path to the root of the bundle directory")
    p.add_argument("--rootless", action="store_true",
                   help="generate a configuration for a rootless container")
    p.set_defaults(func=run)


def example_spec() -> dict[str, Any]:
    """runc's specconv.Example(), in its JSON field order."""
    spec = default_spec(["sh"], terminal=True, hostname="runc")
    spec["root"]["readonly"] = True
    spec["process"]["capabilities"] = {k: list(_EXAMPLE_CAPS) for k in ("bounding", "effective", "permitted")}
    spec["linux"] = {
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "namespaces": spec["linux"]["namespaces"],  # pid, network, ipc, uts, mount, cgroup: runc's order
        "maskedPaths": list(_EXAMPLE_MASKED),
        "readonlyPaths": list(_EXAMPLE_READONLY),
    }
    return spec


def to_rootless(spec: dict[str, Any], uid: int, gid: int) -> dict[str, Any]:
    """runc's specconv.ToRootless(): a user namespace mapping root to ``uid``/``gid``, no network
    namespace, /sys bind-mounted (sysfs needs a network namespace of one's own), no uid=/gid= mount
    options, no cgroup resources. Returns ``spec``, changed in place."""
    linux = spec["linux"]
    namespaces = [ns for ns in linux.get("namespaces", []) if ns.get("type") not in ("network", "user")]
    namespaces.append({"type": "user"})
    replaced = ("uidMappings", "gidMappings", "namespaces", "resources")
    rest = {k: v for k, v in linux.items() if k not in replaced}
    # Go's field order: mappings first, then namespaces, then the rest.
    spec["linux"] = {
        "uidMappings": [{"containerID": 0, "hostID": uid, "size": 1}],
        "gidMappings": [{"containerID": 0, "hostID": gid, "size": 1}],
        "namespaces": namespaces,
        **rest,
    }
    mounts = []
    for mount in spec.get("mounts", []):
        if posixpath.normpath(mount["destination"]) == "/sys":
            mounts.append({"destination": "/sys", "type": "none", "source": "/sys",
                           "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]})
            continue
        mount = dict(mount)
        options = [o for o in mount.get("options") or [] if not o.startswith(("gid=", "uid="))]
        if options:
            mount["options"] = options
        else:
            mount.pop("options", None)  # Go omits an empty options list
        mounts.append(mount)
    spec["mounts"] = mounts
    return spec


def run(args: argparse.Namespace) -> int:
    spec = example_spec()
    if args.rootless:
        to_rootless(spec, os.geteuid(), os.getegid())
    bundle = Path(args.bundle or ".")
    if not bundle.is_dir():
        # runc chdirs into the bundle first, and that is the error it reports.
        reason = "not a directory" if bundle.exists() else "no such file or directory"
        raise SpecError(f"chdir {args.bundle}: {reason}")
    data = json.dumps(spec, indent="\t").encode()  # runc: MarshalIndent with a tab, no final newline
    try:
        # O_EXCL: the existence check and the write are one step, so two racing `spec`s cannot both win.
        fd = os.open(bundle / SPEC_CONFIG, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        raise SpecError(f"File {SPEC_CONFIG} exists. Remove it first") from None
    except OSError as exc:
        raise SpecError(f"open {SPEC_CONFIG}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return 0
