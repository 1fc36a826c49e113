"""Run a container's OCI hooks (prestart, createRuntime, ..., poststop) as runc does.

Each hook runs on the host, in the spec's order, with the container's state JSON on stdin, its own
argv and environment, the bundle as working directory, and its `timeout` enforced by SIGKILL. The
first failing hook stops the kind and raises HookError, worded like runc:

    error running prestart hook #0: exit status 1, stdout: ..., stderr: ...

(runc >= 1.2 wording; runc 1.1 said "error running hook #0: error running hook: exit status 1, ...").
Poststart and poststop failures are not fatal by the runtime spec: the caller passes fatal=False and
the failure is logged as a warning and the remaining hooks still run.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from kata.errors import KataError
from kata.oci.spec import HOOK_KINDS
from kata.utils.signals import describe_signal

_log = logging.getLogger(__name__)

# After killing a hook that ran past its timeout, how long to wait for its output pipes to close:
# a grandchild may hold them open forever, and the hook's own exit is what matters.
_DRAIN_AFTER_KILL_S = 1.0


class HookError(KataError):
    """A hook failed; the message is runc's one line naming the kind, index and cause."""


def state_for_hooks(
    container_id: str,
    status: str,
    bundle: str,
    *,
    pid: int | None = None,
    annotations: Mapping[str, str] | None = None,
    oci_version: str = "1.0.2",
) -> dict[str, Any]:
    """The runtime-spec state a hook reads on stdin, with runc's field order and omissions.

    runc's statuses per kind: prestart, createRuntime and createContainer see "creating";
    startContainer "created"; poststart "running" (runc 1.1, which runs them at create time,
    said "created"); poststop "stopped". pid and annotations are omitted when unset, as Go's
    omitempty does.
    """
    state: dict[str, Any] = {"ociVersion": oci_version, "id": container_id, "status": status}
    if pid:
        state["pid"] = pid
    state["bundle"] = bundle
    if annotations:
        state["annotations"] = dict(annotations)
    return state


def run_hooks(
    spec: Mapping[str, Any],
    kind: str,
    state: Mapping[str, Any],
    *,
    fatal: bool = True,
    log: logging.Logger | None = None,
) -> None:
    """Run every hook of ``kind`` in ``spec`` in order; HookError on the first failure when ``fatal``."""
    if kind not in HOOK_KINDS:
        raise ValueError(f"unknown hook kind {kind!r}")
    hooks = (spec.get("hooks") or {}).get(kind) or []
    if not hooks:
        return
    payload = json.dumps(state).encode()
    bundle = state.get("bundle")
    # runc has chdir'd to the bundle before create/run; a vanished bundle must not stop poststop.
    cwd = bundle if isinstance(bundle, str) and os.path.isdir(bundle) else None
    for index, hook in enumerate(hooks):
        failure = _run_one(hook, payload, cwd)
        if failure is None:
            continue
        message = f"error running {kind} hook #{index}: {failure}"
        if fatal:
            raise HookError(message)
        (log or _log).warning(message)


def _run_one(hook: Mapping[str, Any], payload: bytes, cwd: str | None) -> str | None:
    """Run one hook; None on success, else the cause in Go's words."""
    path = str(hook["path"])
    # Go's exec.Cmd: Args[0] is argv[0] and the program is Path; no args means argv is [Path].
    argv = [str(a) for a in hook.get("args") or [path]]
    # Go's exec.Cmd never searches PATH: a bare name is relative to the working directory.
    executable = path if "/" in path else os.path.join(cwd or ".", path)
    try:
        proc = subprocess.Popen(
            argv,
            executable=executable,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=_environment(hook.get("env")),
            close_fds=True,
        )
    except OSError as exc:
        return f"fork/exec {path}: {_strerror(exc)}"

    timeout = hook.get("timeout")
    timeout_s = float(timeout) if timeout is not None else None
    try:
        out, err = proc.communicate(payload, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.communicate(timeout=_DRAIN_AFTER_KILL_S)
        except subprocess.TimeoutExpired:
            proc.wait()
        return f"hook ran past specified timeout of {timeout_s:.1f}s"

    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        status = f"signal: {describe_signal(-proc.returncode)}"
    else:
        status = f"exit status {proc.returncode}"
    stdout = out.decode(errors="replace")
    stderr = err.decode(errors="replace")
    return f"{status}, stdout: {stdout}, stderr: {stderr}"


def _environment(env: Sequence[str] | None) -> dict[str, str] | None:
    """The hook's environment: exactly its `env` list; without one (null or absent), the runtime's own.

    That is Go's exec.Cmd rule, which runc inherits: a nil Env means the parent's environment.
    """
    if env is None:
        return None
    result: dict[str, str] = {}
    for entry in env:
        key, sep, value = str(entry).partition("=")
        if sep:  # later entries win, as Go dedups them
            result[key] = value
    return result


def _strerror(exc: OSError) -> str:
    """Go's errno text: os.strerror with a lower-case first letter ("no such file or directory")."""
    text = os.strerror(exc.errno) if exc.errno else str(exc)
    return text[:1].lower() + text[1:]
