"""Load and validate an OCI bundle (config.json) and exec process files.

Validation happens once, in :func:`load_bundle` / :func:`load_process`, so the typed accessors on
:class:`Bundle` never raise for a bundle that loaded. Error messages are one line, worded like runc's,
because the shim shows the runtime's last error to the user verbatim.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from kata.errors import KataError

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
    spec = _read_json_object(bundle / CONFIG_FILENAME, f"JSON specification file {CONFIG_FILENAME} not found")
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
    proc = _read_json_object(path, f"process file {path} not found")
    _validate_process(proc, "process")
    return proc


def validate_spec(spec: Mapping[str, Any], *, require_process: bool = True) -> None:
    """Check a parsed config.json without touching the filesystem."""
    version = spec.get("ociVersion")
    if not isinstance(version, str) or not version:
        raise OCIError("ociVersion must be set")
    proc = spec.get("process")
    if proc is None:
        if require_process:
            raise OCIError("process property must not be empty")
    else:
        _validate_process(proc, "process")
    root = spec.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str) or not root["path"]:
        raise OCIError("root.path must be set")
    _expect(root.get("readonly", False), bool, "root.readonly")
    _expect(spec.get("hostname", ""), str, "hostname")
    _validate_mounts(spec.get("mounts", []))
    annotations = spec.get("annotations", {})
    _expect(annotations, dict, "annotations")
    for key, value in annotations.items():
        _expect(value, str, f"annotations[{key}]")
    _validate_hooks(spec.get("hooks", {}))
    linux = spec.get("linux", {})
    _expect(linux, dict, "linux")
    _validate_namespaces(linux.get("namespaces", []))
    linux_resources(spec)  # raises on ill-typed limits


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
    )


def _read_json_object(path: Path, missing: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OCIError(missing) from None
    except (OSError, UnicodeDecodeError) as e:
        raise OCIError(f"{path.name}: cannot read: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise OCIError(f"{path.name}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise OCIError(f"{path.name}: invalid JSON: expected an object, got {type(data).__name__}")
    return data


def _validate_process(proc: Any, where: str) -> None:
    _expect(proc, dict, where)
    args = proc.get("args")
    if not isinstance(args, list) or not args:
        raise OCIError(f"{where}.args must not be empty")
    _expect_strs(args, f"{where}.args")
    _expect_strs(proc.get("env", []), f"{where}.env")
    cwd = proc.get("cwd", "/")
    _expect(cwd, str, f"{where}.cwd")
    if not cwd.startswith("/"):
        raise OCIError(f"{where}.cwd must be an absolute path, got {cwd!r}")
    _expect(proc.get("terminal", False), bool, f"{where}.terminal")
    user = proc.get("user", {})
    _expect(user, dict, f"{where}.user")
    for key in ("uid", "gid"):
        if key in user:
            _opt_int(user[key], f"{where}.user.{key}")
    for i, gid in enumerate(user.get("additionalGids") or ()):
        _opt_int(gid, f"{where}.user.additionalGids[{i}]")


def _validate_mounts(mounts: Any) -> None:
    _expect(mounts, list, "mounts")
    for i, m in enumerate(mounts):
        _expect(m, dict, f"mounts[{i}]")
        dest = m.get("destination")
        if not isinstance(dest, str) or not dest:
            raise OCIError(f"mounts[{i}]: destination must not be empty")
        _expect(m.get("type", ""), str, f"mounts[{i}].type")
        _expect(m.get("source", ""), str, f"mounts[{i}].source")
        _expect_strs(m.get("options", []), f"mounts[{i}].options")


def _validate_namespaces(namespaces: Any) -> None:
    _expect(namespaces, list, "linux.namespaces")
    seen: set[str] = set()
    for i, ns in enumerate(namespaces):
        _expect(ns, dict, f"linux.namespaces[{i}]")
        kind = ns.get("type")
        if kind not in KNOWN_NAMESPACES:
            raise OCIError(f"unknown namespace type {kind!r}")
        if kind in seen:
            raise OCIError(f"duplicate namespace {kind}")
        seen.add(kind)
        _expect(ns.get("path", ""), str, f"linux.namespaces[{i}].path")


def _validate_hooks(hooks: Any) -> None:
    _expect(hooks, dict, "hooks")
    for kind in HOOK_KINDS:
        entries = hooks.get(kind, [])
        _expect(entries, list, f"hooks.{kind}")
        for i, h in enumerate(entries):
            _expect(h, dict, f"hooks.{kind}[{i}]")
            if not isinstance(h.get("path"), str) or not h["path"]:
                raise OCIError(f"hooks.{kind}[{i}]: path must not be empty")
            _expect_strs(h.get("args", []), f"hooks.{kind}[{i}].args")
            _expect_strs(h.get("env", []), f"hooks.{kind}[{i}].env")
            if "timeout" in h:
                _opt_int(h["timeout"], f"hooks.{kind}[{i}].timeout")


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


def _expect_strs(value: Any, where: str) -> None:
    _expect(value, list, where)
    for item in value:
        if not isinstance(item, str):
            raise OCIError(f"{where} must be an array of strings")


def _opt_int(value: Any, where: str) -> int | None:
    # bool is an int in Python but not in JSON.
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise OCIError(f"{where} must be an integer")
    return value
