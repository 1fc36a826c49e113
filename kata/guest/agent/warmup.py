"""Warm-up, once the agent serves: do now what every sandbox's first calls would otherwise pay for.

The host snapshots a template VM only once this is done (it polls AgentDetails.warm), so every clone
starts with the handlers' modules imported and crun's code and the kernel paths of a container
start-up already paged in. On a cold boot the host creates its sandbox at once: the warm-up then
stands aside, as on the one vCPU it would only slow the host's calls down.
"""

from __future__ import annotations

import importlib
import os
import struct
import threading
import time
from typing import Any

from kata.guest.agent import log
from kata.guest.agent.crun import CrunError
from kata.guest.agent.layout import helpers_fixed, keep_container_randomised
from kata.guest.agent.sandbox import Sandbox
from kata.oci.crun_annotations import SECCOMP_BPF_DATA, seccomp_bpf_value
from kata.oci.default_spec import default_spec

# A host making a template only polls for the warm-up; one that means to run a container creates its
# sandbox within this long of the agent serving.
GRACE = 0.3

# What the handlers import lazily or only on their first call.
MODULES = (
    "json", "shutil", "glob", "fcntl", "struct", "termios",
    "kata.guest.agent.guestinfo", "kata.guest.agent.mounts", "kata.guest.agent.stats",
    "kata.guest.agent.stdio", "kata.guest.agent.sandbox", "kata.guest.agent.oom",
)  # fmt: skip

# Ids starting with a dot are refused to the host (Sandbox.create_container): no clash possible. Such a
# name is also reserved for kernel keyrings, hence --no-new-keyring.
CONTAINER_ID = ".kata-warmup"

# A container like the ones engines ask for (their default namespaces, mounts, masked paths,
# capabilities and limits, Docker's device rules, a seccomp program, plus a bind mount), so that
# crun's code and the kernel's paths for all of them are paged in (and, in a pooled clone, translated
# by TCG: the device rules and the seccomp program load BPF, 25 ms of Docker's first `crun create`
# there when the warm-up had neither). Its root is an empty directory in the bundle: the guest's own
# root cannot be one (pivot_root onto itself fails with EBUSY).

# Docker's device rules: none but these character devices (and never /dev/fuse, 10:229).
_DEVICES = ((1, 5), (1, 3), (1, 9), (1, 8), (5, 0), (5, 1))  # zero, null, urandom, random, tty, console


def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)  # struct sock_filter, in the machine's byte order


# Allow every system call but one no kernel has (EPERM): a load, a test and two returns, the kinds of
# instruction a compiled profile is made of.
SECCOMP_PROGRAM = b"".join((
    _bpf(0x20, 0, 0, 0),  # BPF_LD | BPF_W | BPF_ABS: seccomp_data.nr
    _bpf(0x15, 0, 1, 0xFFFFFFFF),  # BPF_JMP | BPF_JEQ | BPF_K
    _bpf(0x06, 0, 0, 0x00050000 | 1),  # BPF_RET: SECCOMP_RET_ERRNO | EPERM
    _bpf(0x06, 0, 0, 0x7FFF0000),  # BPF_RET: SECCOMP_RET_ALLOW
))


def _spec() -> dict[str, Any]:
    spec = default_spec(["/bin/busybox", "true"], hostname="warmup")
    spec["process"]["env"] = ["PATH=/bin"]
    spec["root"] = {"path": "rootfs", "readonly": True}
    bind = {"destination": "/bin", "type": "bind", "source": "/bin", "options": ["rbind", "ro"]}
    spec["mounts"].insert(0, bind)
    linux = spec["linux"]
    linux["cgroupsPath"] = f"/kata/{CONTAINER_ID}"
    # Guest containers share the VM's network (specconv drops the network namespace).
    linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] != "network"]
    return spec


def _with_bpf(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with Docker's device rules and the seccomp program (both load BPF in the kernel)."""
    devices = [{"allow": False, "access": "rwm"}, *(
        {"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"}
        for major, minor in _DEVICES), {"allow": False, "type": "c", "major": 10, "minor": 229,
                                        "access": "rwm"}]
    return {**spec, "linux": {**spec["linux"], "resources": {"devices": devices}},
            "annotations": {SECCOMP_BPF_DATA: seccomp_bpf_value(SECCOMP_PROGRAM)}}


# Mount points the read-only root must have already.
_ROOT_DIRS = ("bin", "proc", "dev", "sys")


class Warmup:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.bundle = os.path.join(sandbox.run_dir, CONTAINER_ID)
        self.done = threading.Event()
        self._lock = threading.Lock()  # one warm-up container at a time: they share an id and bundle

    def start(self) -> None:
        threading.Thread(target=self.run, name="warmup", daemon=True).start()

    def run(self, grace: float = GRACE) -> None:
        time.sleep(grace)
        if self.sandbox.id or self.sandbox.containers:
            log.info("warm-up skipped: the host is creating a sandbox already")
            self.done.set()
            return
        began = time.monotonic()
        try:
            for name in MODULES:
                importlib.import_module(name)
            self.run_container()
        except Exception as e:  # a failed warm-up only costs the first container time
            log.warn(f"warm-up: {e}")
        finally:
            self.done.set()
        log.info(f"warm-up done in {time.monotonic() - began:.3f}s")

    def again(self) -> None:
        """The warm-up container once more, for the host (a clone that is kept warm); raises on failure."""
        began = time.monotonic()
        self.run_container()
        log.info(f"warm-up container run again in {time.monotonic() - began:.3f}s")

    def run_container(self) -> None:
        import shutil

        with self._lock:
            try:
                for d in _ROOT_DIRS:
                    os.makedirs(os.path.join(self.bundle, "rootfs", d), exist_ok=True)
                spec = _spec()
                if helpers_fixed():
                    keep_container_randomised(spec)  # as a real container's
                try:
                    self._run(_with_bpf(spec))
                except CrunError as e:
                    # A guest kernel without seccomp filters or BPF device rules (one configured in
                    # place of ours): the rest of the warm-up still pays.
                    log.warn(f"warm-up: {e}; once more without device rules and seccomp")
                    try:  # what the failed run left, if anything
                        self.sandbox.crun.run(["delete", "--force", CONTAINER_ID], log_file=self._log_file)
                    except CrunError:
                        pass
                    self._run(spec)
            finally:
                shutil.rmtree(self.bundle, ignore_errors=True)

    @property
    def _log_file(self) -> str:
        return os.path.join(self.bundle, "crun.log")

    def _run(self, spec: dict[str, Any]) -> None:
        import json

        with open(os.path.join(self.bundle, "config.json"), "w") as f:
            json.dump(spec, f)
        args = ["run", "--no-new-keyring", "--bundle", self.bundle, CONTAINER_ID]
        self.sandbox.crun.run(args, log_file=self._log_file)
