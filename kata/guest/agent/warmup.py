"""Warm-up, once the agent serves: do now what every sandbox's first calls would otherwise pay for.

The host snapshots a template VM only once this is done (it polls AgentDetails.warm), so every clone
starts with the handlers' modules imported and crun's code and the kernel paths of a container
start-up already paged in. On a cold boot the host's first calls come at once and need the same
imports; the throwaway container is skipped then, as it would only compete with the real one.
"""

from __future__ import annotations

import importlib
import os
import threading
import time

from kata.guest.agent import log
from kata.guest.agent.sandbox import Sandbox

# What the handlers import lazily or only on their first call.
MODULES = (
    "json", "shutil", "glob", "fcntl", "struct", "termios",
    "kata.guest.agent.guestinfo", "kata.guest.agent.mounts", "kata.guest.agent.stats",
    "kata.guest.agent.stdio", "kata.guest.agent.sandbox",
)  # fmt: skip

# Ids starting with a dot are refused to the host (Sandbox.create_container): no clash possible. Such a
# name is also reserved for kernel keyrings, hence --no-new-keyring.
CONTAINER_ID = ".kata-warmup"

# A container much like the host's (same namespaces and virtual mounts, a bind mount), on an empty
# root in the bundle: the guest's own root cannot be one (pivot_root onto itself fails with EBUSY).
_SPEC = {
    "ociVersion": "1.0.2",
    "process": {
        "user": {"uid": 0, "gid": 0},
        "args": ["/bin/busybox", "true"],
        "env": ["PATH=/bin"],
        "cwd": "/",
    },
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "warmup",
    "mounts": [
        {"destination": "/bin", "type": "bind", "source": "/bin", "options": ["rbind", "ro"]},
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
    ],
    "linux": {
        "cgroupsPath": f"/kata/{CONTAINER_ID}",
        "namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")],
    },
}
# Mount points the read-only root must have already.
_ROOT_DIRS = ("bin", "proc", "dev")


class Warmup:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.bundle = os.path.join(sandbox.run_dir, CONTAINER_ID)
        self.done = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self.run, name="warmup", daemon=True).start()

    def run(self) -> None:
        began = time.monotonic()
        try:
            for name in MODULES:
                importlib.import_module(name)
            if self.sandbox.id or self.sandbox.containers:
                log.info("warm-up: the host is already creating a sandbox, no throwaway container")
            else:
                self.run_container()
        except Exception as e:  # a failed warm-up only costs the first container time
            log.warn(f"warm-up: {e}")
        finally:
            self.done.set()
        log.info(f"warm-up done in {time.monotonic() - began:.3f}s")

    def run_container(self) -> None:
        import json
        import shutil

        try:
            for d in _ROOT_DIRS:
                os.makedirs(os.path.join(self.bundle, "rootfs", d), exist_ok=True)
            with open(os.path.join(self.bundle, "config.json"), "w") as f:
                json.dump(_SPEC, f)
            log_file = os.path.join(self.bundle, "crun.log")
            args = ["run", "--no-new-keyring", "--bundle", self.bundle, CONTAINER_ID]
            self.sandbox.crun.run(args, log_file=log_file)
        finally:
            shutil.rmtree(self.bundle, ignore_errors=True)
