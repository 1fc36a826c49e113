"""The host ends of a process's stdio, as containerd names them in Create and Exec: fifo paths,
a `file://` log file, or a `binary://` logging program (containerd's LogURI).

Output descriptors are written by kata.agent_client.relay's pumps; stdin is opened by its pump, as its
fifo's open blocks until containerd's side opens it.
"""

from __future__ import annotations

import os
import select
import subprocess
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

from kata.errors import KataError

_BINARY_READY_TIMEOUT = 10.0


class StdioError(KataError):
    pass


@dataclass(frozen=True)
class StdioPaths:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


@dataclass
class ProcessIO:
    """Open output descriptors (None where the process has none) and the logging program, if any."""

    stdout: int | None = None
    stderr: int | None = None
    logger: subprocess.Popen[bytes] | None = None
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        """Close the outputs: readers see EOF; a logging program then drains and exits."""
        if self._closed:
            return
        self._closed = True
        for fd in {self.stdout, self.stderr} - {None}:
            os.close(fd)  # type: ignore[arg-type]
        if self.logger is not None:
            try:
                self.logger.wait(timeout=_BINARY_READY_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.logger.kill()
                self.logger.wait()


def open_outputs(paths: StdioPaths, container_id: str, namespace: str) -> ProcessIO:
    uri = paths.stdout
    if uri.startswith("binary://"):
        return _binary(uri, container_id, namespace)
    if uri.startswith("file://"):
        fd = _log_file(uri)
        return ProcessIO(stdout=fd, stderr=None if paths.terminal else os.dup(fd))
    io = ProcessIO()
    try:
        io.stdout = _fifo(paths.stdout)
        io.stderr = None if paths.terminal else _fifo(paths.stderr)
    except BaseException:
        io.close()
        raise
    return io


def _fifo(path: str) -> int | None:
    if not path:
        return None
    try:
        # Read-write: the open never waits for containerd's reader, and a reader that comes and goes
        # never makes our writes fail. Closing it is still the reader's EOF (we are the only writer).
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise StdioError(f"opening {path}: {exc.strerror}") from exc


def _log_file(uri: str) -> int:
    path = unquote(urlsplit(uri).path)
    if not os.path.isabs(path):
        raise StdioError(f"log URI {uri}: the path must be absolute")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StdioError(f"log file {path}: {exc.strerror}") from exc


def binary_argv(uri: str) -> list[str]:
    """The logging program's command line: its path, then each query key and its value, if any."""
    parts = urlsplit(uri)
    argv = [unquote(parts.path)]
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        argv.append(key)
        if value:
            argv.append(value)
    return argv


def _binary(uri: str, container_id: str, namespace: str) -> ProcessIO:
    """containerd's logging-program protocol: stdout on fd 3, stderr on fd 4, and fd 5 closed (or
    written) once the program is ready to read."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ready_r, ready_w = os.pipe()
    env = {**os.environ, "CONTAINER_ID": container_id, "CONTAINER_NAMESPACE": namespace}

    def child_fds() -> None:
        for target, fd in ((3, out_r), (4, err_r), (5, ready_w)):
            # dup2 clears close-on-exec on the target; close_fds=False below keeps the targets open
            # (every other descriptor of ours is close-on-exec, as Python makes them).
            os.dup2(fd, target)

    try:
        logger = subprocess.Popen(binary_argv(uri), env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=child_fds,
                                  start_new_session=True, close_fds=False)
    except OSError as exc:
        for fd in (out_r, out_w, err_r, err_w, ready_r, ready_w):
            os.close(fd)
        raise StdioError(f"logging binary {uri}: {exc.strerror}") from exc
    for fd in (out_r, err_r, ready_w):
        os.close(fd)
    try:
        ready, _, _ = select.select([ready_r], [], [], _BINARY_READY_TIMEOUT)
        if not ready:
            logger.kill()
            raise StdioError(f"logging binary {uri}: not ready within {_BINARY_READY_TIMEOUT:g}s")
    finally:
        os.close(ready_r)
    return ProcessIO(stdout=out_w, stderr=err_w, logger=logger)


class StdinOpener:
    """Opens a stdin fifo on the pump's thread: the open waits for containerd's writer. cancel()
    completes a pending open with a writer of our own, so the pump sees EOF and ends."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.opened = False
        self._cancelled = threading.Event()

    def open(self) -> int | None:
        """The fifo's read end, or None when cancelled (or it cannot be opened)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        if self._cancelled.is_set():
            os.close(fd)
            return None
        self.opened = True
        return fd

    def cancel(self) -> None:
        self._cancelled.set()
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError:
            pass  # no open pending (ENXIO: no reader) or the fifo is gone
