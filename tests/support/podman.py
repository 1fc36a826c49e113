"""podman (Debian's 4.3, with conmon) for end-to-end tests, with everything it keeps private to its caller.

podman is no daemon: each command is a process, and conmon stands for each container. ``Podman`` gives every
command the same private state under ``/run/ktp-XXXXXXXX``: storage (``--root``, ``--runroot``), its
``containers.conf`` (``CONTAINERS_CONF``: cgroupfs, file events and locks, its tmp dir, the runtime "kata"),
and a CNI network named "podman" (podman's default) whose bridge, address leases and port mappings live in
the network namespace the commands run in (entered with nsenter, as the daemons are), so that nothing of
them reaches the host's. Pods get a cgroup parent named after the directory, removed at the end. The busybox
and pause images (tests.support.images) are loaded at start; the pause image is the pods' infra image.

    with temporary_netns("ktpod") as ns, Podman(kata_runtime_path(), ns) as podman:
        podman.run("run", "--rm", podman.image, "echo", "hi")

podman runs a runtime's ``start``, ``kill`` and ``delete`` with an empty environment (conmon gets
``conmon_env_vars``): when the caller has PYTHONPATH set (a work tree's kata package), the runtime is given
as a two-line script in the directory that sets it and execs the real one. What stays outside: podman's
netns files in /run/netns and libcni's result cache while containers run (both removed at each container's
cleanup), and the blob-info cache that podman load and skopeo share (/var/lib/containers/cache).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self

from kata.config.toml_out import dumps
from tests.support.cri_config import CNI_BIN_DIR, CNI_CACHE_DIR
from tests.support.daemons import (
    CGROUP_ROOT,
    NETNS_DIR,
    DaemonError,
    _dir_leftovers,
    _env,
    _make_dir,
    _release_dir,
    _run,
)
from tests.support.images import IMAGE_REF, PAUSE_REF, busybox_archives

PODMAN_PREFIX = "ktp-"
PODMAN = "/usr/bin/podman"
CONMON = "/usr/bin/conmon"
RUNTIME_NAME = "kata"  # a name podman knows: it passes `--log-format json` to it, as to runc and crun
POD_SUBNET = "10.89.0.0/24"
KATA_ROOT = Path("/run/kata-runtime")  # kata-runtime's --root when none is given


def podman_missing_tools() -> list[str]:
    tools = [PODMAN, CONMON, f"{CNI_BIN_DIR}/bridge", f"{CNI_BIN_DIR}/host-local", f"{CNI_BIN_DIR}/portmap"]
    return [t for t in tools if not os.access(t, os.X_OK)]


class Podman:
    """podman's commands, all with the private state described in the module's docstring."""

    image = IMAGE_REF
    pause_image = PAUSE_REF

    def __init__(self, runtime: str, netns: str) -> None:
        self.runtime = runtime
        self.netns = netns
        self._base: Path | None = None
        self._ids: set[str] = set()  # every container seen, for leftovers()

    @property
    def base(self) -> Path:
        if self._base is None:
            raise DaemonError("Podman was not started")
        return self._base

    @property
    def runtime_path(self) -> str:
        """What podman runs as the OCI runtime (the PYTHONPATH script when there is one)."""
        return str(self.base / "kata-runtime") if os.environ.get("PYTHONPATH") else self.runtime

    @property
    def cgroup_parent(self) -> str:
        """A cgroup parent for pods (``pod create --cgroup-parent``), which stop() removes."""
        return f"/{self.base.name}"

    @property
    def network_name(self) -> str:
        return "podman"

    # ---- set-up ---------------------------------------------------------------------------------
    def containers_conf(self) -> dict[str, object]:
        b = self.base
        env = [f"PATH={_env()['PATH']}"]
        if os.environ.get("PYTHONPATH"):
            env.append(f"PYTHONPATH={os.environ['PYTHONPATH']}")
        return {
            # conmon stays in our cgroup: podman would otherwise make /libpod_parent/conmon for it
            "containers": {"cgroups": "no-conmon"},
            "network": {"network_backend": "cni", "network_config_dir": f"{b}/cni",
                        "cni_plugin_dirs": [CNI_BIN_DIR], "default_network": self.network_name},
            "engine": {
                "cgroup_manager": "cgroupfs", "events_logger": "file",
                "events_logfile_path": f"{b}/events.log",
                "tmp_dir": f"{b}/tmp", "lock_type": "file", "static_dir": f"{b}/root/libpod",
                "volume_path": f"{b}/root/volumes", "infra_image": self.pause_image, "conmon_env_vars": env,
                "runtime": RUNTIME_NAME, "runtimes": {RUNTIME_NAME: [self.runtime_path]},
            },
        }

    def cni_conflist(self) -> dict[str, object]:
        """podman's default network, its address leases under our directory (host-local's default,
        /var/lib/cni/networks, would outlive us), with port mappings."""
        bridge = {
            "type": "bridge", "bridge": ("cni-" + self.base.name.rsplit("-", 1)[-1])[:15], "isGateway": True,
            "ipMasq": False, "hairpinMode": True,
            "ipam": {"type": "host-local", "dataDir": f"{self.base}/cni-ipam",
                     "ranges": [[{"subnet": POD_SUBNET}]], "routes": [{"dst": "0.0.0.0/0"}]},
        }
        portmap = {"type": "portmap", "capabilities": {"portMappings": True}}
        return {"cniVersion": "0.4.0", "name": self.network_name, "plugins": [bridge, portmap]}

    def start(self) -> Self:
        self._base = _make_dir(PODMAN_PREFIX)
        try:
            for sub in ("cni", "tmp"):
                (self.base / sub).mkdir()
            (self.base / "cni" / "87-podman.conflist").write_text(json.dumps(self.cni_conflist(), indent=1))
            if os.environ.get("PYTHONPATH"):
                script = self.base / "kata-runtime"
                pythonpath, runtime = shlex.quote(os.environ["PYTHONPATH"]), shlex.quote(self.runtime)
                script.write_text(f'#!/bin/sh\nPYTHONPATH={pythonpath} exec {runtime} "$@"\n')
                script.chmod(0o755)
            (self.base / "containers.conf").write_text(dumps(self.containers_conf()))
            archives = busybox_archives()
            for archive in (archives.oci, archives.pause):
                proc = self.run("load", "-q", "-i", str(archive))
                if proc.returncode != 0:
                    raise DaemonError(f"podman load failed: {proc.stderr.strip()}")
        except BaseException:
            self.stop()
            raise
        return self

    # ---- commands -------------------------------------------------------------------------------
    def command(self, *args: str) -> list[str]:
        """``podman`` with our storage, in our network namespace (global options may lead ``args``)."""
        b = self.base
        return ["nsenter", f"--net={NETNS_DIR}/{self.netns}", PODMAN, "--root", f"{b}/root",
                "--runroot", f"{b}/runroot", "--storage-driver", "overlay", *args]

    def env(self) -> dict[str, str]:
        return _env(CONTAINERS_CONF=str(self.base / "containers.conf"))

    def run(self, *args: str, timeout: float = 120.0, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        """``podman ARGS...``; the caller checks the status."""
        return _run(self.command(*args), timeout, input, self.env())

    # ---- tear-down ------------------------------------------------------------------------------
    def container_ids(self) -> set[str]:
        """Every container podman made here, removed ones included (from its event log)."""
        ids = set()
        with contextlib.suppress(OSError), open(self.base / "events.log") as log:
            for line in log:
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict) and event.get("Type") == "container" and event.get("ID"):
                        ids.add(str(event["ID"]))
        return ids

    def stop(self) -> None:
        """Remove every pod and container (with their VMs and networks), then the storage, the directory
        and the pods' cgroups. Raises DaemonError naming what could not be removed."""
        if self._base is None or not self.base.exists():
            return
        problems = []
        if (self.base / "containers.conf").exists():
            for args in (("pod", "rm", "--all", "--force"), ("rm", "--all", "--force")):
                try:
                    proc = self.run(*args, "--time", "2", timeout=120)
                except DaemonError as e:
                    problems.append(str(e))
                    continue
                if proc.returncode != 0:
                    problems.append(f"podman {' '.join(args[:2])}: {proc.stderr.strip()}")
        self._ids = self.container_ids()
        problems += _release_dir(self.base)  # the storage's overlay mounts
        for top in self._cgroups():
            for parent, _, _ in os.walk(top, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(parent)
        if problems:
            raise DaemonError(f"podman cleanup: {'; '.join(problems)}")

    def _cgroups(self) -> list[Path]:
        name = self.base.name
        return sorted(p for p in (*CGROUP_ROOT.glob(f"*/{name}"), CGROUP_ROOT / name) if p.is_dir())

    def leftovers(self) -> list[str]:
        """What of ours is still on the host: processes naming the directory (conmon), mounts under
        it, the directory, the pods' cgroups, and what names one of our containers: libcni's cache
        entries, the runtime's records (podman gives it no --root: runc's default, ours /run/kata-runtime)."""
        if self._base is None:
            return []
        found = _dir_leftovers(self.base, ())
        found += [f"cgroup {p}" for p in self._cgroups()]
        found += [f"CNI cache {p}" for p in CNI_CACHE_DIR.glob(f"{self.network_name}-*")
                  if any(cid in p.name for cid in self._ids)]
        found += [f"runtime state {KATA_ROOT / cid}" for cid in sorted(self._ids)
                  if (KATA_ROOT / cid).exists()]
        return found

    def __enter__(self) -> Self:
        return self if self._base is not None else self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
