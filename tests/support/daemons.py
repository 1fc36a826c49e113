"""A real containerd and dockerd for end-to-end tests and benchmarks, each private to its caller.

Every daemon keeps its state, sockets, configuration and log under its own short directory in /run
(``/run/ktc-XXXXXXXX`` for containerd, ``/run/ktd-XXXXXXXX`` for dockerd): unix socket paths are limited
to 108 bytes, and dockerd's exec-root ends up in every runtime's ``--root``. Nothing is installed as a
service and no host-wide configuration is written. ``stop()`` removes the containers, ends the daemon and
every shim and container process it started, unmounts what it mounted under its directory and removes
the directory; ``leftovers()`` lists whatever survived.

    with docker_daemons(runtimes={"kata": Runtime(kata_runtime_path())}) as docker:
        docker.run("run", "--rm", "--runtime", "kata", docker.image, "echo", "hi")

``Containerd(cri=True, netns=NAME, runtimes={"kata": KATA})`` serves the CRI API on its socket too
(``tests.support.cri`` is a client), with the runtime handlers ``runc`` and those given, the locally built
pause image as sandbox image and a CNI bridge network (``tests.support.cri_config``), in the network
namespace NAME so that the bridge and the pods' addresses stay off the host.

A directory whose owner (the process that made it) is dead is swept at the next start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from kata.config.toml_out import dumps
from kata.errors import KataError
from kata.utils.mount import mounts_under, unmount
from tests.support.cri_config import (
    CNI_BIN_DIR,
    CNI_CACHE_DIR,
    CRI_NAMESPACE,
    CRI_PLUGIN,
    DEFAULT_POD_SUBNET,
    CriRuntime,
    cni_bridge_name,
    cni_network_name,
    cri_plugin_config,
    write_cni_config,
)
from tests.support.images import (
    IMAGE_NAME,
    IMAGE_REF,
    busybox_docker_archive,
    busybox_oci_archive,
    pause_oci_archive,
)

if TYPE_CHECKING:
    from tests.support.cri import CriClient  # grpc and generated code: only for cri=True

RUN_DIR = Path("/run")
CONTAINERD_PREFIX = "ktc-"
SHIM_SOCKET_DIR = "/run/containerd/s"  # where every containerd's shims listen, whatever its state dir
DOCKERD_PREFIX = "ktd-"
# Debian's docker.io puts its client beside the daemon's package; a newer client earlier on PATH
# (some hosts have one in /usr/local/bin) would talk to dockerd 20.10 through API negotiation instead.
DOCKER_CLIENT = "/usr/bin/docker"
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NETNS_DIR = "/run/netns"
CGROUP_ROOT = Path("/sys/fs/cgroup")
CNI_PLUGINS = ("bridge", "host-local", "loopback")


class DaemonError(KataError):
    """A test daemon could not be started or driven."""


def kata_runtime_path() -> str:
    return shutil.which("kata-runtime") or "/usr/local/bin/kata-runtime"


def docker_client() -> str | None:
    return DOCKER_CLIENT if os.access(DOCKER_CLIENT, os.X_OK) else shutil.which("docker")


def missing_tools() -> list[str]:
    """The commands the daemons need that are not installed (scripts/install.sh provides them)."""
    tools = ("containerd", "ctr", "containerd-shim-runc-v2", "runc", "dockerd", "skopeo", "umoci")
    missing = [t for t in tools if shutil.which(t, path=_env()["PATH"]) is None]
    if docker_client() is None:
        missing.append("docker")
    return missing


def cri_missing_tools() -> list[str]:
    """What a CRI-enabled containerd needs beyond missing_tools(): nsenter and the CNI plugins."""
    missing = [] if shutil.which("nsenter", path=_env()["PATH"]) else ["nsenter"]
    plugins = [f"{CNI_BIN_DIR}/{p}" for p in CNI_PLUGINS]
    return missing + [p for p in plugins if not os.access(p, os.X_OK)]


def _shim_dirs() -> list[str]:
    """Where containerd must look for containerd-shim-kata-v2: beside kata-runtime (whose /usr/local/bin
    entry may be a symlink into the venv) and in this interpreter's environment."""
    dirs = [os.path.dirname(os.path.realpath(kata_runtime_path())), os.path.join(sys.prefix, "bin")]
    return list(dict.fromkeys(dirs))


# --- processes --------------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()  # fields from the state (3rd) on


def _alive(pid: int) -> bool:
    """Running (a zombie has exited: it only waits for its parent to reap it)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields else None  # field 22, starttime


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every running process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        fields = _stat_fields(pid)
        if fields is None or fields[0] in ("Z", "X"):
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        table[pid] = (int(fields[1]), cmd.strip())
    return table


def _naming(text: str, table: Mapping[int, tuple[int, str]]) -> set[int]:
    """Processes whose command line contains ``text`` (our own process excepted)."""
    return {pid for pid, (_, cmd) in table.items() if text in cmd and pid != os.getpid()}


def _with_descendants(roots: Iterable[int], table: Mapping[int, tuple[int, str]]) -> set[int]:
    found = set(roots)
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in table.items() if ppid in found and pid not in found}
        found |= more
        grew = bool(more)
    return found


def _kill(pids: Iterable[int], timeout: float = 10.0) -> None:
    """SIGKILL ``pids``; the shim sockets they listened on go too (a killed shim cannot remove its own)."""
    pids = {p for p in pids if p != os.getpid()}
    sockets = _listening_shim_sockets(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: not any(_alive(p) for p in pids), timeout)
    for path in sockets:
        path.unlink(missing_ok=True)


def _listening_shim_sockets(pids: Iterable[int]) -> list[Path]:
    """The unix sockets under SHIM_SOCKET_DIR that ``pids`` hold open (their network namespace's
    /proc/PID/net/unix names them by inode)."""
    found: set[Path] = set()
    for pid in pids:
        inodes: set[str] = set()
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/unix") as table:
            for line in table.readlines()[1:]:
                fields = line.split()
                if len(fields) >= 8 and fields[6] in inodes and fields[7].startswith(f"{SHIM_SOCKET_DIR}/"):
                    found.add(Path(fields[7]))
    return sorted(found)


def _wait_for(done: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if done():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _end(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL if the process is still there after ``timeout`` seconds; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


# --- private directories ----------------------------------------------------------------------------

def _owner_mark() -> str:
    return f"{os.getpid()} {_start_time(os.getpid())}\n"


def _owner_alive(base: Path) -> bool:
    try:
        pid_s, start = (base / "owner").read_text().split()
    except (OSError, ValueError):
        # Being made right now (its owner not written yet): a minute's grace.
        try:
            return time.time() - base.stat().st_mtime < 60
        except OSError:
            return False
    return _start_time(int(pid_s)) == start


def _make_dir(prefix: str) -> Path:
    sweep_stale()
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=RUN_DIR))
    (base / "owner").write_text(_owner_mark())
    return base


def _release_dir(base: Path) -> list[str]:
    """Unmount everything under ``base`` and remove it; what could not be done."""
    problems = []
    for _ in range(3):  # a detached mount can uncover one below it
        points = mounts_under(str(base))
        if not points:
            break
        for point in points:
            try:
                unmount(point)
            except OSError as e:
                problems.append(str(e))
    shutil.rmtree(base, ignore_errors=True)
    if base.exists():
        problems.append(f"could not remove {base}")
    return problems


def _dir_leftovers(base: Path, pids: Iterable[int]) -> list[str]:
    found = []
    table = _process_table()
    for pid in sorted(_naming(str(base), table) | {p for p in pids if p in table}):
        found.append(f"process {pid}: {table[pid][1][:160]}")
    found += [f"mount {p}" for p in mounts_under(str(base))]
    if base.exists():
        found.append(f"directory {base}")
    return found


def sweep_stale() -> list[Path]:
    """Remove the daemons' directories whose owner died without stopping them, with what runs there."""
    swept = []
    for base in sorted(RUN_DIR.glob("kt[cdp]-*")):  # podman's too (tests.support.podman)
        if not base.is_dir() or _owner_alive(base):
            continue
        table = _process_table()
        _kill(_with_descendants(_naming(str(base), table), table))
        _release_dir(base)
        if base.name.startswith(CONTAINERD_PREFIX):
            _release_cri_host_state(base, host_bridge=True)
        swept.append(base)
    return swept


# --- what a CRI containerd leaves outside its directory ---------------------------------------------

def _pod_cgroups(base: Path) -> list[Path]:
    """The cgroup directories under the pods' parent (Containerd.cgroup_parent), in every hierarchy."""
    return sorted(p for p in (*CGROUP_ROOT.glob(f"*/{base.name}"), CGROUP_ROOT / base.name) if p.is_dir())


def _cri_host_leftovers(base: Path, host_bridge: bool) -> list[str]:
    found = [f"cgroup {p}" for p in _pod_cgroups(base)]
    found += [f"CNI cache {p}" for p in CNI_CACHE_DIR.glob(f"{cni_network_name(base)}-*")]
    if host_bridge and Path(f"/sys/class/net/{cni_bridge_name(base)}").exists():
        found.append(f"bridge {cni_bridge_name(base)}")
    return found


def _release_cri_host_state(base: Path, host_bridge: bool) -> list[str]:
    """Remove the pods' empty cgroups, libcni's cache entries for the daemon's network and, when it ran in
    the host's network namespace, its bridge; what could not be removed."""
    problems = []
    for top in _pod_cgroups(base):
        for parent, _, _ in os.walk(top, topdown=False):  # children first: rmdir takes only empty ones
            try:
                os.rmdir(parent)
            except OSError as e:
                problems.append(f"cgroup {parent}: {e.strerror}")
    for entry in CNI_CACHE_DIR.glob(f"{cni_network_name(base)}-*"):
        entry.unlink(missing_ok=True)
    bridge = cni_bridge_name(base)
    if host_bridge and Path(f"/sys/class/net/{bridge}").exists():
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30, check=False)
        if Path(f"/sys/class/net/{bridge}").exists():
            problems.append(f"could not delete bridge {bridge}")
    return problems


def _run(cmd: Sequence[str], timeout: float, input: str | None, env: Mapping[str, str]
         ) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(cmd), input=input, stdin=None if input is not None else subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, env=dict(env))
    except subprocess.TimeoutExpired as e:
        raise DaemonError(f"`{' '.join(cmd[:6])} ...` did not finish in {timeout:g} s") from e
    except FileNotFoundError as e:
        raise DaemonError(f"{cmd[0]} not found: install it (scripts/install.sh)") from e


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "CONTAINERD_"))}
    env["PATH"] = env.get("PATH", _PATH) + ":" + _PATH
    env.update(extra)
    return env


# --- containerd -------------------------------------------------------------------------------------

def _launch(name: str, argv: list[str], log_path: Path, base: Path, hint: str,
            env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a daemon in its own session with its output in log_path; its directory goes if it cannot."""
    with open(log_path, "wb") as log:
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=dict(env or _env()), start_new_session=True)
        except FileNotFoundError as e:
            _release_dir(base)
            raise DaemonError(f"{name} not found: {hint}") from e


def _await_ready(name: str, proc: subprocess.Popen[bytes], log_path: Path, stop: Callable[[], None],
                 timeout: float, interval: float, answers: Callable[[], bool]) -> None:
    """Wait until the daemon answers; stop it and fail with its log's tail if it exits or never does."""
    done = _wait_for(lambda: proc.poll() is not None or answers(), timeout, interval)
    if not done or proc.poll() is not None:
        status = "exited" if proc.poll() is not None else f"not ready after {timeout:g} s"
        detail = _tail(log_path)
        stop()
        raise DaemonError(f"{name} {status}: {detail}")


class _Daemon:
    """What both daemons share: a private directory, the process, and use as a context manager."""

    _base: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> Path:
        """The daemon's directory (it exists from start() to stop())."""
        if self._base is None:
            raise DaemonError(f"{type(self).__name__} was not started")
        return self._base

    def start(self, timeout: float = 30.0) -> Self:
        raise NotImplementedError

    def stop(self, timeout: float = 120.0) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self if self.proc is not None else self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class Containerd(_Daemon):
    """``containerd --config FILE`` with root, state, sockets and log under /run/ktc-XXXXXXXX.

    ``cri``: enable the CRI plugin (see the module's docstring); ``runtimes`` are its runtime handlers
    besides ``runc`` (e.g. ``{"kata": cri_config.KATA}``). ``netns``: run containerd, and so the shims and
    the CNI plugins it starts, in this `ip netns` namespace (entered with nsenter, see FACTS.md).
    """

    image = IMAGE_REF  # the name `import_image` gives the busybox image

    def __init__(self, cri: bool = False, netns: str | None = None,
                 runtimes: Mapping[str, CriRuntime] | None = None,
                 pod_subnet: str = DEFAULT_POD_SUBNET) -> None:
        if runtimes and not cri:
            raise DaemonError("CRI runtime handlers need Containerd(cri=True)")
        self.cri = cri
        self.netns = netns
        self.runtimes = dict(runtimes or {})
        self.pod_subnet = pod_subnet
        self._base: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._pids: set[int] = set()  # shims and their children, as last seen at stop

    @property
    def socket(self) -> Path:
        return self.base / "c.sock"

    @property
    def log(self) -> Path:
        return self.base / "containerd.log"

    @property
    def cgroup_parent(self) -> str:
        """A cgroup parent for pods (``run_pod(cgroup_parent=...)``), which stop() removes."""
        return f"/{self.base.name}"

    def config(self) -> dict[str, object]:
        b = self.base
        plugins: dict[str, object] = {
            # The opt plugin would otherwise create /opt/containerd.
            "io.containerd.internal.v1.opt": {"path": f"{b}/opt"},
        }
        if self.cri:
            plugins[CRI_PLUGIN] = cri_plugin_config(b, self.runtimes)
        return {
            "version": 2, "root": f"{b}/root", "state": f"{b}/state", "temp": f"{b}/tmp",
            "disabled_plugins": [] if self.cri else [CRI_PLUGIN],
            "grpc": {"address": str(self.socket)}, "ttrpc": {"address": f"{b}/c.ttrpc"},
            "debug": {"level": "info"}, "plugins": plugins,
        }

    def argv(self) -> list[str]:
        argv = ["containerd", "--config", str(self.base / "config.toml")]
        return argv if self.netns is None else ["nsenter", f"--net={NETNS_DIR}/{self.netns}", *argv]

    def _daemon_env(self) -> dict[str, str]:
        env = _env()
        env["PATH"] = ":".join([*_shim_dirs(), env["PATH"]])  # shims are found on containerd's PATH
        return env

    def start(self, timeout: float = 30.0) -> Self:
        self._base = _make_dir(CONTAINERD_PREFIX)
        (self.base / "tmp").mkdir()
        if self.cri:
            write_cni_config(self.base, self.pod_subnet)
        (self.base / "config.toml").write_text(dumps(self.config()))
        self.proc = _launch("containerd", self.argv(), self.log, self.base, "install it (scripts/install.sh)",
                            self._daemon_env())
        _await_ready("containerd", self.proc, self.log, self.stop, timeout, 0.02,
                     lambda: self.socket.exists() and self.ctr("version", timeout=10).returncode == 0)
        if self.cri:
            self._prepare_cri(timeout)
        return self

    def _prepare_cri(self, timeout: float) -> None:
        """The pause image in the CRI namespace, and the plugin ready (runtime and network)."""
        from tests.support.cri import CriError

        try:
            self.import_image(pause_oci_archive(), namespace=CRI_NAMESPACE)
            with self.cri_client() as client:
                client.wait_ready(timeout)
        except (DaemonError, CriError) as e:
            detail = _tail(self.log)
            with contextlib.suppress(DaemonError):
                self.stop()
            raise DaemonError(f"containerd's CRI plugin: {e} ({detail})") from e

    def cri_client(self, timeout: float | None = None) -> CriClient:
        """A client of this containerd's CRI API (close it, or use it as a context manager)."""
        from tests.support.cri import DEFAULT_TIMEOUT, CriClient

        if not self.cri:
            raise DaemonError("this containerd runs without its CRI plugin (Containerd(cri=True))")
        return CriClient(self.socket, DEFAULT_TIMEOUT if timeout is None else timeout)

    def ctr(self, *args: str, namespace: str = "default", timeout: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """``ctr -a SOCK -n NAMESPACE ARGS...``; the caller checks the status."""
        return _run(["ctr", "-a", str(self.socket), "-n", namespace, *args], timeout, input, _env())

    def import_image(self, archive: Path | None = None, namespace: str = "default") -> str:
        """Import the busybox image (or ``archive``); the name it is known by. The CRI plugin sees the
        images of namespace ``k8s.io`` (cri_config.CRI_NAMESPACE)."""
        proc = self.ctr("images", "import", str(archive or busybox_oci_archive()), namespace=namespace)
        if proc.returncode != 0:
            raise DaemonError(f"ctr images import failed: {proc.stderr.strip()}")
        return self.image

    def _shims(self) -> set[int]:
        table = _process_table()
        return _with_descendants(_naming(f"-address {self.socket}", table), table)

    def _remove_pods(self, timeout: float) -> list[str]:
        """Stop and remove every CRI pod through the plugin, which tears down its network too."""
        from tests.support.cri import CriError

        try:
            with self.cri_client() as client:
                return client.remove_all_pods(timeout)
        except CriError as e:
            return [str(e)]

    def _remove_tasks(self, timeout: float) -> None:
        """Kill and delete every task and container, so the shims clean up after them as they would."""
        deadline = time.monotonic() + timeout
        spaces = self.ctr("namespaces", "ls", "-q", timeout=10)
        for ns in spaces.stdout.split() if spaces.returncode == 0 else []:
            tasks = self.ctr("tasks", "ls", "-q", namespace=ns, timeout=10)
            for task in tasks.stdout.split() if tasks.returncode == 0 else []:
                left = max(deadline - time.monotonic(), 1.0)
                with contextlib.suppress(DaemonError):
                    self.ctr("tasks", "delete", "--force", task, namespace=ns, timeout=left)
            containers = self.ctr("containers", "ls", "-q", namespace=ns, timeout=10)
            for c in containers.stdout.split() if containers.returncode == 0 else []:
                with contextlib.suppress(DaemonError):
                    self.ctr("containers", "delete", c, namespace=ns, timeout=10)

    def stop(self, timeout: float = 120.0) -> None:
        """Remove CRI pods, then tasks and containers (within ``timeout``), end containerd (SIGTERM, SIGKILL
        after 30 s), kill the shims and their processes that remain, unmount and remove the directory and
        what the CRI plugin left outside it. Raises DaemonError naming what failed, once all is done."""
        if self.proc is None:
            return
        problems = []
        if self.proc.poll() is None:
            if self.cri:
                problems += self._remove_pods(timeout)
            with contextlib.suppress(DaemonError):
                self._remove_tasks(timeout)
        self._pids = self._shims()
        _end(self.proc, 30.0)
        # Shims outlive containerd by design; ours name our socket in their -address argument.
        self._pids |= self._shims()
        _kill(self._pids)
        # kata's shims started a zygote that would outlive them by design (kata.shim.zygote): a
        # test's or a benchmark's daemon leaves none behind.
        from kata.shim import zygote

        with contextlib.suppress(OSError):
            zygote.stop()
        self.proc = None
        problems += _release_dir(self.base)
        if self.cri:
            problems += _release_cri_host_state(self.base, host_bridge=self.netns is None)
        if problems:
            raise DaemonError(f"containerd cleanup: {'; '.join(problems)}")

    def traces_of(self, ident: str) -> list[str]:
        """What is left of a pod or container (its id) while the daemon runs: processes naming it (the shim's
        ``-id``, a VMM), mounts and paths under the directory, the CNI cache entry, cgroups."""
        table = _process_table()
        found = [f"process {pid}: {table[pid][1][:160]}" for pid in sorted(_naming(ident, table))]
        found += [f"mount {p}" for p in mounts_under(str(self.base)) if ident in p]
        # os.walk, not rglob: directories vanish while a pod goes, and walk ignores that
        found += [f"path {os.path.join(d, n)}" for d, dirs, files in os.walk(self.base) for n in dirs + files
                  if ident in n]
        found += [f"CNI cache {p}" for p in CNI_CACHE_DIR.glob(f"{cni_network_name(self.base)}-{ident}-*")]
        found += [f"cgroup {p}" for p in CGROUP_ROOT.glob(f"*/{self.base.name}/**/*{ident}*")]
        return found

    def leftovers(self) -> list[str]:
        """Processes, mounts and files of this daemon that are still there."""
        if self._base is None:
            return []
        found = _dir_leftovers(self._base, self._pids)
        if self.cri:
            found += _cri_host_leftovers(self._base, host_bridge=self.netns is None)
        return found


# --- dockerd ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Runtime:
    """An OCI runtime for daemon.json's "runtimes": a runc-compatible binary and its extra arguments."""

    path: str
    args: tuple[str, ...] = field(default_factory=tuple)


class Dockerd(_Daemon):
    """``dockerd`` on a given Containerd, with data-root, exec-root, socket and log under /run/ktd-XXXXXXXX,
    no networking (``--bridge=none``, no iptables), and the runtimes given in its daemon.json."""

    image = IMAGE_NAME

    def __init__(self, containerd: Containerd, runtimes: Mapping[str, Runtime] | None = None,
                 default_runtime: str | None = None, netns: str | None = None) -> None:
        """``netns``: run dockerd, with its default bridge networking, in this `ip netns` namespace."""
        self.netns = netns
        self.containerd = containerd
        self.runtimes = dict(runtimes or {})
        self.default_runtime = default_runtime
        self._base: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = docker_client() or "docker"

    @property
    def socket(self) -> Path:
        return self.base / "d.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def exec_root(self) -> Path:
        return self.base / "x"

    @property
    def data_root(self) -> Path:
        return self.base / "data"

    @property
    def log(self) -> Path:
        return self.base / "dockerd.log"

    def daemon_json(self) -> dict[str, object]:
        runtimes: dict[str, object] = {}
        for name, rt in self.runtimes.items():
            runtimes[name] = {"path": rt.path, **({"runtimeArgs": list(rt.args)} if rt.args else {})}
        # dockerd 20.10 would otherwise create /etc/docker/key.json
        config: dict[str, object] = {"runtimes": runtimes, "deprecated-key-path": str(self.base / "key.json")}
        if self.default_runtime:
            config["default-runtime"] = self.default_runtime
        return config

    def argv(self) -> list[str]:
        b = self.base
        argv = ["dockerd", "--config-file", str(b / "daemon.json"), "--pidfile", str(b / "dockerd.pid"),
                "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
                "-H", self.host, "--containerd", str(self.containerd.socket)]
        if self.netns is None:
            # no networking, and no change to the host's iptables or ip_forward
            return argv + ["--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none",
                           "--userland-proxy=false"]
        # Docker's default bridge, its iptables rules and ip_forward all inside a namespace of the
        # caller's (nsenter: `ip netns exec` would remount /sys and hide the cgroup mounts).
        return ["nsenter", f"--net=/run/netns/{self.netns}", *argv]

    def _client_env(self) -> dict[str, str]:
        return _env(DOCKER_CONFIG=str(self.base / "client"))  # not ~/.docker

    def start(self, timeout: float = 60.0) -> Self:
        if self.containerd.proc is None:
            raise DaemonError("dockerd needs a running containerd")
        self._base = _make_dir(DOCKERD_PREFIX)
        (self.base / "daemon.json").write_text(json.dumps(self.daemon_json(), indent=1))
        self.proc = _launch("dockerd", self.argv(), self.log, self.base,
                            "install docker.io (scripts/install.sh)")
        _await_ready("dockerd", self.proc, self.log, self.stop, timeout, 0.05,
                     lambda: self.socket.exists() and self.run("info", timeout=10).returncode == 0)
        return self

    def run(self, *args: str, timeout: float = 120.0, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        """``docker -H unix://SOCK ARGS...``; the caller checks the status."""
        return _run([self.client, "-H", self.host, *args], timeout, input, self._client_env())

    def load_image(self, archive: Path | None = None) -> str:
        """``docker load`` the busybox image (or ``archive``); the name it is known by."""
        proc = self.run("load", "-i", str(archive or busybox_docker_archive()))
        if proc.returncode != 0:
            raise DaemonError(f"docker load failed: {proc.stderr.strip()}")
        return self.image

    def container_ids(self) -> list[str]:
        proc = self.run("ps", "-aq", "--no-trunc", timeout=30)
        return proc.stdout.split() if proc.returncode == 0 else []

    def stop(self, timeout: float = 120.0) -> None:
        """``docker rm -f`` every container (within ``timeout``), end dockerd (SIGTERM, SIGKILL after 30 s),
        unmount and remove the directory. Its containerd is left running: stop it after."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            ids = self.container_ids()
            if ids:
                with contextlib.suppress(DaemonError):
                    self.run("rm", "-f", *ids, timeout=timeout)
        _end(self.proc, 30.0)
        self.proc = None
        problems = _release_dir(self.base)  # dockerd leaves overlay and netns mounts behind
        if problems:
            raise DaemonError(f"dockerd cleanup: {'; '.join(problems)}")

    def leftovers(self) -> list[str]:
        return _dir_leftovers(self._base, ()) if self._base else []



@contextlib.contextmanager
def containerd_daemon(import_image: bool = True, cri: bool = False, netns: str | None = None,
                      runtimes: Mapping[str, CriRuntime] | None = None) -> Iterator[Containerd]:
    """A running Containerd with the busybox image (in namespace "default", or "k8s.io" for the CRI);
    stopped on exit."""
    with Containerd(cri=cri, netns=netns, runtimes=runtimes) as containerd:
        if import_image:
            containerd.import_image(namespace=CRI_NAMESPACE if cri else "default")
        yield containerd


@contextlib.contextmanager
def docker_daemons(runtimes: Mapping[str, Runtime] | None = None, default_runtime: str | None = None,
                   load_image: bool = True, netns: str | None = None) -> Iterator[Dockerd]:
    """A running Dockerd (on its own Containerd) with the busybox image loaded; both stopped on exit."""
    with Containerd() as containerd, Dockerd(containerd, runtimes, default_runtime, netns) as dockerd:
        if load_image:
            dockerd.load_image()
        yield dockerd
