"""Load and validate an OCI bundle (config.json) and exec process files.

Validation happens once, in :func:`load_bundle` / :func:`load_process`, so the typed accessors on
:class:`Bundle` never raise for a bundle that loaded. Error messages are one line, worded like runc's,
because the shim shows the runtime's last error to the user verbatim.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from kata.errors import KataError
from kata.oci import schema, versions
from kata.utils.files import NotReadable, read_regular_file
from kata.utils.ids import shown

CONFIG_FILENAME = "config.json"

# Every namespace type the runtime-spec defines for Linux.
KNOWN_NAMESPACES = frozenset({"pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time"})

HOOK_KINDS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")


class OCIError(KataError):
    """The bundle or process file is unusable; the message is one line for the user."""


@dataclass(frozen=True)
class User:
    uid: int = 0
    gid: int = 0
    additional_gids: tuple[int, ...] = ()
    umask: int | None = None


@dataclass(frozen=True)
class Process:
    args: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    terminal: bool
    user: User


@dataclass(frozen=True)
class Mount:
    destination: str
    type: str
    source: str
    options: tuple[str, ...]

    @property
    def is_bind(self) -> bool:
        # runc treats a mount as a bind mount by its options as well as by its type.
        return self.type == "bind" or "bind" in self.options or "rbind" in self.options

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


@dataclass(frozen=True)
class Namespace:
    type: str
    path: str | None = None


@dataclass(frozen=True)
class Resources:
    """The subset of linux.resources that sizes the VM; None means "not limited"."""

    memory_limit: int | None = None  # bytes
    cpu_quota: int | None = None  # microseconds per period
    cpu_period: int | None = None  # microseconds
    cpuset_cpus: str | None = None
    cpuset_mems: str | None = None
    cpu_shares: int | None = None  # a relative weight: it sizes nothing, the host's cgroup carries it


@dataclass(frozen=True)
class Hook:
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: int | None = None


@dataclass(frozen=True)
class Hooks:
    prestart: tuple[Hook, ...] = ()
    create_runtime: tuple[Hook, ...] = ()
    create_container: tuple[Hook, ...] = ()
    start_container: tuple[Hook, ...] = ()
    poststart: tuple[Hook, ...] = ()
    poststop: tuple[Hook, ...] = ()


@dataclass(frozen=True)
class Bundle:
    """A validated bundle. ``spec`` is the parsed config.json; treat it as read-only."""

    path: Path
    spec: dict[str, Any]

    @property
    def process(self) -> Process | None:
        proc = self.spec.get("process")
        return parse_process(proc) if proc is not None else None

    @property
    def root_path(self) -> Path:
        """root.path, made absolute against the bundle (relative paths are the usual case)."""
        return self.path / self.spec["root"]["path"]

    @property
    def root_readonly(self) -> bool:
        return bool(self.spec["root"].get("readonly", False))

    @property
    def hostname(self) -> str | None:
        return self.spec.get("hostname")

    @property
    def mounts(self) -> tuple[Mount, ...]:
        return tuple(_mount(m) for m in self.spec.get("mounts") or ())

    @property
    def annotations(self) -> Mapping[str, str]:
        return MappingProxyType(dict(self.spec.get("annotations") or {}))

    @property
    def namespaces(self) -> tuple[Namespace, ...]:
        linux = self.spec.get("linux") or {}
        return tuple(Namespace(n["type"], n.get("path") or None) for n in linux.get("namespaces") or ())

    @property
    def resources(self) -> Resources:
        return linux_resources(self.spec)

    @property
    def hooks(self) -> Hooks:
        raw = self.spec.get("hooks") or {}

        def kind(name: str) -> tuple[Hook, ...]:
            return tuple(
                Hook(
                    path=h["path"],
                    args=tuple(h.get("args") or ()),
                    env=tuple(h.get("env") or ()),
                    timeout=h.get("timeout"),
                )
                for h in raw.get(name) or ()
            )

        return Hooks(
            prestart=kind("prestart"),
            create_runtime=kind("createRuntime"),
            create_container=kind("createContainer"),
            start_container=kind("startContainer"),
            poststart=kind("poststart"),
            poststop=kind("poststop"),
        )


def load_bundle(bundle: Path, *, require_process: bool = True) -> Bundle:
    """Read ``bundle``/config.json and validate what the runtime relies on.

    ``require_process`` is for create/run; verbs that only need the root and mounts may pass False.
    """
    if not bundle.is_dir():
        raise OCIError(f"bundle {bundle} does not exist or is not a directory")
    spec = read_json_object(bundle / CONFIG_FILENAME, f"JSON specification file {CONFIG_FILENAME} not found")
    validate_spec(spec, require_process=require_process)
    loaded = Bundle(path=bundle.absolute(), spec=spec)
    root = loaded.root_path
    if not root.exists():
        raise OCIError(f"rootfs ({root}) does not exist")
    if not root.is_dir():
        raise OCIError(f"rootfs ({root}) is not a directory")
    return loaded


def load_process(path: Path) -> dict[str, Any]:
    """Read a ``--process`` file (a bare runtime-spec process object, as docker exec writes)."""
    proc = read_json_object(path, f"process file {path} not found")
    validate_process(proc, "process")
    return proc


def validate_spec(spec: Mapping[str, Any], *, require_process: bool = True) -> None:
    """Check a parsed config.json without touching the filesystem: the JSON type of every field we
    or the guest's crun read (kata.oci.schema), then what those values must mean."""
    _raise(versions.version_problem(spec.get("ociVersion")))
    proc = spec.get("process")
    if proc is None and require_process:
        raise OCIError("process property must not be empty")
    _raise(schema.problem(spec, schema.SPEC, ""))
    if proc is not None:
        _check_process(proc, "process")
    root = spec.get("root")
    if not isinstance(root, dict) or not root.get("path"):
        raise OCIError("root.path must be set")
    _check_mounts(spec.get("mounts") or [], relative_ok=versions.relative_destinations(spec["ociVersion"]))
    _check_hooks(spec.get("hooks") or {})
    linux = spec.get("linux") or {}
    _check_namespaces(linux.get("namespaces") or [])
    _check_resources(linux.get("resources") or {}, "linux.resources")
    linux_resources(spec)
    _raise(versions.unhonoured_in_spec(spec))


def validate_resources(res: Any, where: str) -> None:
    """Check an OCI LinuxResources object (config.json's, or new limits for a running container)."""
    _raise(schema.problem(res, schema.SPEC["linux"]["resources"], where))
    _check_resources(res or {}, where)


def validate_process(proc: Any, where: str) -> None:
    """Check an OCI process object (config.json's, a --process file, a shim Exec's spec)."""
    if proc is None:
        raise OCIError(f"{where} must be an object")
    _raise(schema.problem(proc, schema.PROCESS, where))
    _check_process(proc, where)


def parse_process(proc: Mapping[str, Any]) -> Process:
    """Typed view of a validated process object (from config.json or a --process file)."""
    user = proc.get("user") or {}
    return Process(
        args=tuple(proc["args"]),
        env=tuple(proc.get("env") or ()),
        cwd=proc.get("cwd") or "/",
        terminal=bool(proc.get("terminal", False)),
        user=User(
            uid=user.get("uid", 0),
            gid=user.get("gid", 0),
            additional_gids=tuple(user.get("additionalGids") or ()),
            umask=user.get("umask"),
        ),
    )


def linux_resources(spec: Mapping[str, Any]) -> Resources:
    """The VM-sizing limits of a spec; raises OCIError when they are ill-typed."""
    linux = spec.get("linux") or {}
    res = linux.get("resources") or {}
    _expect(res, dict, "linux.resources")
    memory = res.get("memory") or {}
    cpu = res.get("cpu") or {}
    _expect(memory, dict, "linux.resources.memory")
    _expect(cpu, dict, "linux.resources.cpu")
    limit = _opt_int(memory.get("limit"), "linux.resources.memory.limit")
    quota = _opt_int(cpu.get("quota"), "linux.resources.cpu.quota")
    period = _opt_int(cpu.get("period"), "linux.resources.cpu.period")
    shares = _opt_int(cpu.get("shares"), "linux.resources.cpu.shares")
    cpus = cpu.get("cpus")
    mems = cpu.get("mems")
    _expect(cpus if cpus is not None else "", str, "linux.resources.cpu.cpus")
    _expect(mems if mems is not None else "", str, "linux.resources.cpu.mems")
    # -1 and 0 both mean "no limit" in what docker, containerd and podman write.
    return Resources(
        memory_limit=limit if limit is not None and limit > 0 else None,
        cpu_quota=quota if quota is not None and quota > 0 else None,
        cpu_period=period if period is not None and period > 0 else None,
        cpuset_cpus=cpus or None,
        cpuset_mems=mems or None,
        cpu_shares=shares if shares is not None and shares > 0 else None,
    )


# The guest's kernel (Linux 6.1) and its rlimits and capabilities, by the names runc's Go code uses.
GUEST_NAMESPACES = KNOWN_NAMESPACES - {"time"}  # built without CONFIG_TIME_NS
CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
    "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)  # fmt: skip
RLIMITS = frozenset({
    "RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_LOCKS", "RLIMIT_MEMLOCK",
    "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_RSS", "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME", "RLIMIT_SIGPENDING", "RLIMIT_STACK",
})  # fmt: skip
# A cpuset list as the kernel takes it: "0-3,5".
_CPUSET = re.compile(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*", re.ASCII)


def read_json_object(path: Path, missing: str) -> dict[str, Any]:
    """A JSON object from ``path`` (read bounded: kata.utils.files); every failure is an OCIError
    naming the file, ``missing`` when there is none."""
    try:
        raw = read_regular_file(path)
    except FileNotFoundError:
        raise OCIError(missing) from None
    except OSError as e:
        raise OCIError(f"{path.name}: cannot read: {e.strerror}") from None
    except NotReadable as e:
        raise OCIError(f"{path.name}: {e}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise OCIError(f"{path.name}: invalid JSON: not UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise OCIError(f"{path.name}: invalid JSON: {e}") from None
    except RecursionError:
        raise OCIError(f"{path.name}: invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise OCIError(f"{path.name}: invalid JSON: expected an object, got {_json_kind(data)}")
    return data


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", str: "a string", list: "an array"}.get(type(value), "a number")


def _raise(problem: str | None) -> None:
    if problem:
        raise OCIError(problem)


def _no_nul(value: str, where: str) -> None:
    # A NUL cannot reach exec(2) or a path: the guest's crun would fail on it after the VM booted.
    if "\0" in value:
        raise OCIError(f"{where} contains a NUL byte")


def _check_process(proc: dict[str, Any], where: str) -> None:
    """What a process's values must mean, its types checked (schema.PROCESS)."""
    args = proc.get("args")
    if not args:
        raise OCIError(f"{where}.args must not be empty")
    for i, arg in enumerate(args):
        _no_nul(arg, f"{where}.args[{i}]")
    for entry in proc.get("env") or ():
        _check_env(entry)
    cwd = proc.get("cwd", "/")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise OCIError(f"{where}.cwd must be an absolute path, got {cwd!r}")
    _no_nul(cwd, f"{where}.cwd")
    for kind in schema.CAPABILITY_SETS:
        for cap in (proc.get("capabilities") or {}).get(kind) or ():
            if cap not in CAPABILITIES:
                raise OCIError(f"unknown capability {shown(cap)!r}")  # crun refuses one; runc warns
    for i, rl in enumerate(proc.get("rlimits") or ()):
        if rl.get("type") not in RLIMITS:
            raise OCIError(f"wrong rlimit value: {shown(str(rl.get('type')))}")  # runc's words
        if (rl.get("soft") or 0) > (rl.get("hard") or 0):
            raise OCIError(f"{where}.rlimits[{i}]: the soft limit {rl.get('soft')} is above the hard "
                           f"limit {rl.get('hard') or 0}")
    score = proc.get("oomScoreAdj")
    if score is not None and not -1000 <= score <= 1000:
        raise OCIError(f"{where}.oomScoreAdj must be from -1000 to 1000, got {score}")
    _raise(versions.unhonoured_in_process(proc, where))


def _check_env(entry: str) -> None:
    """runc's rules for an environment variable (libcontainer's populateProcessEnvironment)."""
    name, eq, _ = entry.partition("=")
    if not eq:
        raise OCIError(f"invalid environment variable {shown(entry)!r}: missing '='")
    if not name:
        raise OCIError("invalid environment variable: name cannot be empty")
    _no_nul(entry, f"environment variable {shown(name)!r}")


def _check_mounts(mounts: list[dict[str, Any]], relative_ok: bool) -> None:
    """``relative_ok``: the spec's version lets a destination be relative to the container's root."""
    for i, m in enumerate(mounts):
        dest = m.get("destination")
        if not dest:
            raise OCIError(f"mounts[{i}]: destination must not be empty")
        if not dest.startswith("/") and not relative_ok:
            raise OCIError(f"mounts[{i}]: destination must be an absolute path, got {dest!r}")
        for key in ("destination", "source", "type"):
            _no_nul(m.get(key) or "", f"mounts[{i}].{key}")


def _check_namespaces(namespaces: list[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for i, ns in enumerate(namespaces):
        kind = ns.get("type")
        if kind not in KNOWN_NAMESPACES:
            raise OCIError(f"unknown namespace type {kind!r}")
        if kind not in GUEST_NAMESPACES:
            raise OCIError(f"namespace {kind} is not supported: the guest kernel has none")
        if kind in seen:
            raise OCIError(f"duplicate namespace {kind}")
        seen.add(kind)
        path = ns.get("path") or ""
        if path and not path.startswith("/"):
            raise OCIError(f"linux.namespaces[{i}].path must be an absolute path, got {path!r}")
        _no_nul(path, f"linux.namespaces[{i}].path")


def _check_hooks(hooks: dict[str, Any]) -> None:
    for kind in HOOK_KINDS:
        for i, h in enumerate(hooks.get(kind) or ()):
            path = h.get("path")
            if not path:
                raise OCIError(f"hooks.{kind}[{i}]: path must not be empty")
            if not path.startswith("/"):
                raise OCIError(f"hooks.{kind}[{i}]: path must be an absolute path, got {path!r}")
            _no_nul(path, f"hooks.{kind}[{i}].path")
            if h.get("timeout") is not None and h["timeout"] <= 0:
                raise OCIError(f"hooks.{kind}[{i}].timeout must be positive, got {h['timeout']}")


def _check_resources(res: dict[str, Any], where: str) -> None:
    """Values the types allow but the kernel's cgroups refuse: a negative size other than -1
    ("unlimited"), a cpuset that is no list of CPUs."""
    for section, key in (("memory", "limit"), ("memory", "reservation"), ("memory", "swap"),
                         ("cpu", "quota"), ("pids", "limit")):
        value = (res.get(section) or {}).get(key)
        if value is not None and value < -1:
            raise OCIError(f"{where}.{section}.{key} must be -1 (unlimited) or more, got {value}")
    for key in ("cpus", "mems"):
        value = (res.get("cpu") or {}).get(key)
        if value and not _CPUSET.fullmatch(value):
            raise OCIError(f"{where}.cpu.{key}: {shown(value)!r} is not a list of numbers "
                           "and ranges (e.g. 0-3,5)")


def _mount(m: Mapping[str, Any]) -> Mount:
    return Mount(
        destination=m["destination"],
        type=m.get("type") or "",
        source=m.get("source") or "",
        options=tuple(m.get("options") or ()),
    )


_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}


def _expect(value: Any, kind: type, where: str) -> None:
    if not isinstance(value, kind):
        raise OCIError(f"{where} must be {_JSON_NAMES.get(kind, kind.__name__)}")


def _opt_int(value: Any, where: str) -> int | None:
    # bool is an int in Python but not in JSON.
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise OCIError(f"{where} must be an integer")
    return value
