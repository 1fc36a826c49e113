"""Runs crun, the OCI runtime inside the guest, through the reaper; one function per verb we use."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence

from kata.guest.agent import log
from kata.guest.agent.reaper import Reaper

CRUN = "/usr/bin/crun"
CRUN_ROOT = "/run/crun"
# crun itself takes well under a second in the guest; this only bounds a hung crun.
_TIMEOUT = 60.0


class CrunError(Exception):
    pass


class Crun:
    def __init__(self, reaper: Reaper, binary: str = CRUN, root: str = CRUN_ROOT) -> None:
        self.reaper = reaper
        self.binary = binary
        self.root = root

    def _argv(self, log_file: str, args: Sequence[str]) -> list[str]:
        return [self.binary, "--root", self.root, "--log", log_file, "--log-format", "json", *args]

    def run(
        self,
        args: Sequence[str],
        *,
        log_file: str,
        stdio: tuple[int, int, int] | None = None,
        capture: bool = False,
    ) -> bytes:
        """Run `crun args`; return its stdout when `capture`; raise CrunError with crun's own message."""
        null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        out_r = out_w = -1
        try:
            if capture:
                out_r, out_w = os.pipe()
            fds = stdio if stdio is not None else (null, out_w if capture else null, null)
            log.debug(f"crun {' '.join(args)}")
            began = time.monotonic()
            fut = self.reaper.spawn(self._argv(log_file, args), stdin=fds[0], stdout=fds[1], stderr=fds[2])
            out = b""
            if capture:
                os.close(out_w)
                out_w = -1
                chunks = []
                while chunk := os.read(out_r, 65536):
                    chunks.append(chunk)
                out = b"".join(chunks)
            code = fut.wait(_TIMEOUT)
            log.debug(f"crun {args[0]} exited {code} after {time.monotonic() - began:.3f}s")
            if code is None:
                os.kill(fut.pid, 9)
                raise CrunError(f"crun {args[0]} timed out")
            if code != 0:
                raise CrunError(f"crun {args[0]} failed ({code}): {runc_wording(last_error(log_file))}")
            return out
        finally:
            for fd in (null, out_r, out_w):
                if fd >= 0:
                    os.close(fd)


def last_error(log_file: str) -> str:
    """The last message crun wrote to its JSON log."""
    import json  # only on failures: json's imports cost start-up time in the guest

    try:
        with open(log_file, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return "no log"
    for raw in reversed(lines):
        try:
            return str(json.loads(raw).get("msg", raw.decode(errors="replace")))
        except ValueError:
            if raw.strip():
                return raw.decode(errors="replace")
    return "no message"


def runc_wording(message: str) -> str:
    """crun's message for a missing executable, worded as runc's: Docker and containerd read that
    wording to report "command not found" (exit status 127) rather than a runtime failure."""
    import re

    m = re.search(r"executable file `(.*)` not found in \$PATH", message)
    if m:
        return f'exec: "{m.group(1)}": executable file not found in $PATH'
    if "open executable" in message and "Permission denied" in message:
        return f"{message} (permission denied)"
    return message


class ConsoleSocket:
    """The --console-socket crun connects to, to hand over the pty master through SCM_RIGHTS."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(1)

    def receive(self, timeout: float = 5.0) -> int:
        # crun sent the fd before it exited: the connection waits in the backlog.
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(timeout)
            _, fds, _, _ = socket.recv_fds(conn, 4096, 4)
        if not fds:
            raise CrunError("crun sent no pty master on the console socket")
        for extra in fds[1:]:
            os.close(extra)
        return fds[0]

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
