"""Bad input, of every kind the runtime takes, fails early, in one line, and leaves nothing behind.

A corpus of cases: ids, bundles, config.json fields, command-line flags, the shim's requests and
commands, and the CRI's and Kata's annotations. Each case must

- fail: a non-zero exit (an error status for a shim request);
- say why in exactly one line, in runc's words where runc has some, without a traceback;
- leave nothing: no new entry under --root, KATA_STATE_ROOT or KATA_SHARED_ROOT (temporary for the
  session) or in the case's own directory (no pid file), no mount, no process.

Nothing boots and no daemon runs. The configuration names a QEMU and a kernel that do not exist, so a
case that got past every check would fail there, later and in other words, instead of booting; in
this process, joining or making a network namespace and handing a monitor its work fail at once too.
The test `test_the_base_bundle_gets_past_every_check` shows that the base bundle every config.json
case starts from does get that far: each case fails for its own defect.

Most cases call kata.cli.main in this process (a kata-runtime process costs ~0.3 s here); every
fourth runs the installed command, as containerd's runc shim does (--log FILE --log-format json),
to prove the exit code and that the log's last error is the same line.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.any_pb2 import Any as AnyPb

from kata import ttrpc
from kata.cli.main import main
from kata.config import dump_config, load_config
from kata.config.load import PACKAGED_CONFIG
from kata.config.toml_out import dumps
from kata.oci.default_spec import default_spec
from kata.protocols.containerd.api.types import mount_pb2
from kata.protocols.containerd.pkg.runtimeoptions.v1 import api_pb2 as runtimeoptions
from kata.protocols.containerd.runtime.v2.task import shim_pb2 as pb
from kata.runc.state import ContainerRecord, ContainerStore
from kata.sandbox import paths
from kata.shim import address
from kata.shim.service import TaskService
from kata.shim.tasks import PodTasks
from kata.utils.ids import shown
from tests.conftest import process_gone, runtime_bin

# As root, as containerd and Docker run the runtime (some cases mount a rootfs); no VM, no daemon.
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the runtime runs as root")

# Every id, path and process of this session carries it: what is left behind is found by it.
TAG = f"kbi{uuid.uuid4().hex[:6]}"
CID = TAG  # a valid id, for the cases whose defect is elsewhere
NOWHERE = "/nonexistent/kata-bad-input"  # the configuration's QEMU, kernel and virtiofsd live here
PROCESS_JSON = {"args": ["/bin/true"], "cwd": "/", "env": ["PATH=/bin"]}
HOST_NETWORK = ("host networking is not supported: the {what} runs in a VM, which cannot share the host's "
                "network namespace")
KATA_HV, KATA_RT = "io.katacontainers.config.hypervisor.", "io.katacontainers.config.runtime."


# ---- the session's world ------------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    base: Path
    root: Path  # --root
    state: Path  # KATA_STATE_ROOT
    shared: Path  # KATA_SHARED_ROOT
    config: Path  # the tripwire configuration
    permissive: Path  # the same, with every hypervisor annotation enabled
    cases: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "KATA_STATE_ROOT": str(self.state), "KATA_SHARED_ROOT": str(self.shared),
                "KATA_CONF_FILE": str(self.config)}


def _tripwire_config(path: Path, base: Path, **hypervisor: Any) -> Path:
    """The packaged configuration, with a QEMU, kernel and virtiofsd that do not exist."""
    data = dump_config(load_config(PACKAGED_CONFIG))
    del data["meta"]
    data["hypervisor"]["qemu"].update(
        path=f"{NOWHERE}/qemu", valid_hypervisor_paths=[f"{NOWHERE}/*"], kernel=f"{NOWHERE}/kernel",
        image=f"{NOWHERE}/image", virtio_fs_daemon=f"{NOWHERE}/virtiofsd",
        valid_virtio_fs_daemon_paths=[f"{NOWHERE}/*"], **hypervisor)
    data["factory"].update(enable_template=False, template_path=str(base / "templates"))
    path.write_text(dumps(data))
    return path


class Tripwire(AssertionError):
    """A case got past every check: in a real run, a VM would be booted for bad input."""


def _tripped(*_args: Any, **_kwargs: Any) -> None:
    raise Tripwire("got past every check (a network namespace or a monitor was next)")


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    # Short: the sandbox ids' limit depends on how long KATA_STATE_ROOT is (socket paths).
    base = Path(tempfile.mkdtemp(prefix="kbi", dir="/tmp"))
    w = World(base=base, root=base / "root", state=base / "vc", shared=base / "shared",
              config=_tripwire_config(base / "tripwire.toml", base),
              permissive=_tripwire_config(base / "permissive.toml", base, enable_annotations=[".*"]),
              cases=base / "cases")
    w.cases.mkdir()
    w.root.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        # This process read KATA_STATE_ROOT and KATA_SHARED_ROOT when kata.sandbox.paths was imported.
        for name, value in (("STATE_ROOT", w.state), ("VM_ROOT", w.state / "vm"), ("SHARED_ROOT", w.shared),
                            ("TEMPLATE_VM_ROOT", w.state / "template-vm")):
            mp.setattr(paths, name, value)
        mp.setenv("KATA_CONF_FILE", str(w.config))
        mp.setattr("kata.utils.netns.unshare", _tripped)
        mp.setattr("kata.utils.netns.enter", _tripped)
        mp.setattr("kata.runc.monitor_launch.PendingMonitor.configure", _tripped)
        yield w
    shutil.rmtree(base)


# ---- leftovers ------------------------------------------------------------------------------------
def _tree(top: Path) -> set[str]:
    return {str(p.relative_to(top)) for p in top.rglob("*")} if top.exists() else set()


def _ours(world: World) -> list[str]:
    """Mounts and processes of this session (by its directory or its tag)."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point.startswith(str(world.base)) or TAG in point:
            found.append(f"mount {point}")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if (TAG in cmd or str(world.base) in cmd) and int(pid) != os.getpid() and not process_gone(int(pid)):
            found.append(f"process {pid}: {cmd.replace(chr(0), ' ')[:100]}")
    return found


@dataclass
class Snapshot:
    world: World
    case_dir: Path
    trees: dict[str, set[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.trees = self._take()

    def _take(self) -> dict[str, set[str]]:
        w = self.world
        return {"--root": _tree(w.root), "KATA_STATE_ROOT": _tree(w.state),
                "KATA_SHARED_ROOT": _tree(w.shared), "the case's directory": _tree(self.case_dir)}

    def assert_nothing_left(self) -> None:
        after = self._take()
        for where, before in self.trees.items():
            assert after[where] <= before, f"new in {where}: {sorted(after[where] - before)}"
        assert _ours(self.world) == []


def _one_line(text: str) -> str:
    assert "Traceback" not in text, text
    lines = text.splitlines()
    assert len(lines) == 1, f"{len(lines)} lines: {text!r}"
    return lines[0]


# ---- kata-runtime cases ---------------------------------------------------------------------------
Setup = Callable[[Path], object]


@dataclass(frozen=True)
class Cli:
    """kata-runtime ARGV must fail with "kata-runtime: EXPECT". "{d}" in both is the case's directory,
    where ``setup`` makes what the case needs (a bundle in {d}/b, files)."""

    name: str
    argv: tuple[str, ...]
    expect: str
    setup: Setup | None = None
    partial: bool = False  # EXPECT is a part of the line (paths it cannot know, parser details)
    stdin: str = ""
    globals: tuple[str, ...] | None = None  # instead of --root ROOT --config TRIPWIRE
    logged: bool = True  # False for refused command lines: the log is not open yet


def _bundle(spec: dict[str, Any] | None = None, rootfs: bool = True) -> Setup:
    def setup(d: Path) -> None:
        b = d / "b"
        b.mkdir()
        if rootfs:
            (b / "rootfs").mkdir()
        (b / "config.json").write_text(json.dumps(spec if spec is not None else base_spec()))
    return setup


def _writes(data: str | bytes, name: str = "") -> Callable[[Path], object]:
    """Writes ``data`` to the path it is given (to PATH/NAME with a name)."""
    def write(p: Path) -> None:
        target = p / name if name else p
        if isinstance(data, bytes):
            target.write_bytes(data)
        else:
            target.write_text(data)
    return write


def _steps(*steps: Setup) -> Setup:
    """One setup doing several, in order."""
    def run(d: Path) -> None:
        for step in steps:
            step(d)
    return run


def _raw_bundle(write: Callable[[Path], object]) -> Setup:
    """A bundle with a rootfs whose config.json ``write`` makes (it gets the path)."""
    def setup(d: Path) -> None:
        (d / "b" / "rootfs").mkdir(parents=True)
        write(d / "b" / "config.json")
    return setup


def base_spec() -> dict[str, Any]:
    """A spec every check accepts (Docker's shape, a network namespace of its own)."""
    return default_spec(["/bin/true"])


def changed(**top: Any) -> dict[str, Any]:
    """The base spec with top-level fields replaced (None removes one)."""
    spec = base_spec()
    for key, value in top.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    return spec


def proc(**fields: Any) -> dict[str, Any]:
    p = copy.deepcopy(base_spec()["process"])
    p.update(fields)
    return p


def linux(**fields: Any) -> dict[str, Any]:
    return {**base_spec()["linux"], **fields}


def create(name: str, spec: dict[str, Any], expect: str) -> Cli:
    return Cli(name, ("create", "--bundle", "{d}/b", CID), expect, _bundle(spec))


# ids ----------------------------------------------------------------------------------------------
_VERB_ARGS = {  # what each verb needs besides the id to get as far as checking it
    "create": ("--bundle", "{d}/b"), "run": ("--bundle", "{d}/b"), "exec": (), "update": ("--memory", "1g"),
}
_VERBS = ("create", "run", "start", "state", "kill", "delete", "pause", "resume", "exec", "ps", "events",
          "update")


def _id_cases() -> list[Cli]:
    limit_msg = "longer than "
    bad = {
        "dotdot-slash": ("../x", "invalid id format: ../x"),
        "dotdot": ("..", "invalid id format: .."),
        "non-ascii": ("caf\u00e9", "invalid id format: caf\\xe9"),
        "long-for-a-vm": ("v" * 70, f"invalid id format: {'v' * 70}: {limit_msg}"),
    }
    cases = []
    for verb in _VERBS:
        for label, (cid, expect) in bad.items():
            argv = (verb, *_VERB_ARGS.get(verb, ()), cid, *(["true"] if verb == "exec" else []))
            setup = _bundle() if verb in ("create", "run") else None
            cases.append(Cli(f"id-{verb}-{label}", argv, expect, setup, partial=label == "long-for-a-vm"))
        cases.append(Cli(f"id-{verb}-empty", (verb, *_VERB_ARGS.get(verb, ()), ""),
                         "container id cannot be empty", _bundle() if verb in ("create", "run") else None))
    # delete --force acts on what an id names: every odd byte (NUL cannot be in argv), in one id.
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_+-.")
    for code in range(1, 128):
        if chr(code) not in allowed:
            cid = f"a{chr(code)}b"
            cases.append(Cli(f"id-byte-{code:02x}", ("delete", "--force", cid),
                             f"invalid id format: {shown(cid)}"))
    for label, cid, expect in (
        ("slash-abs", "/etc", "invalid id format: /etc"),
        ("dot", ".", "invalid id format: ."),
        ("traversal-deep", "../../../../tmp", "invalid id format: ../../../../tmp"),
        ("zero-width", "a\u200bb", "invalid id format: a\\u200bb"),
        ("arabic-digits", "\u0661\u0662", "invalid id format: \\u0661\\u0662"),
        ("line-separator", "a\u2028b", "invalid id format: a\\u2028b"),
        ("too-long", "x" * 5000, f"invalid id format: {'x' * 80}...: longer than 128 characters"),
    ):
        cases.append(Cli(f"id-delete-force-{label}", ("delete", "--force", cid), expect))
        cases.append(Cli(f"id-kill-{label}", ("kill", cid, "9"), expect))
    cases.append(Cli("id-leading-dash", ("state", "-x"), '"state" requires exactly 1 argument(s)',
                     logged=False))
    cases.append(Cli("id-leading-dash-kill", ("kill", "-x", "9"), "flag provided but not defined: -x",
                     logged=False))
    return cases


# bundles ------------------------------------------------------------------------------------------
def _symlink(target: str) -> Callable[[Path], object]:
    return lambda p: p.symlink_to(target)


def _bundle_cases() -> list[Cli]:
    def run_in(bundle: str = "{d}/b") -> tuple[str, ...]:
        return ("create", "--bundle", bundle, CID)

    def file_bundle(d: Path) -> None:
        (d / "b").write_text("{}")

    def no_config(d: Path) -> None:
        (d / "b" / "rootfs").mkdir(parents=True)

    def config_dir(d: Path) -> None:
        (d / "b" / "rootfs").mkdir(parents=True)
        (d / "b" / "config.json").mkdir()

    def fifo(p: Path) -> None:
        os.mkfifo(p)

    def loop(p: Path) -> None:
        p.symlink_to(p.name)

    def rootfs_file(d: Path) -> None:
        (d / "b").mkdir()
        (d / "b" / "rootfs").write_text("")
        (d / "b" / "config.json").write_text(json.dumps(base_spec()))

    big = 16 << 20
    return [
        Cli("bundle-missing", run_in("{d}/nope"),
            "bundle {d}/nope does not exist or is not a directory"),
        Cli("bundle-is-a-file", run_in(), "bundle {d}/b does not exist or is not a directory",
            file_bundle),
        Cli("bundle-relative-missing", ("create", "--bundle", "relative-nope", CID),
            "relative-nope does not exist or is not a directory", partial=True),
        Cli("bundle-no-config", run_in(), "JSON specification file config.json not found",
            no_config),
        Cli("bundle-config-is-a-dir", run_in(), "config.json: cannot read: Is a directory", config_dir),
        Cli("bundle-config-empty", run_in(),
            "config.json: invalid JSON: Expecting value: line 1 column 1 (char 0)",
            _raw_bundle(_writes(""))),
        *(Cli(f"bundle-config-{label}", run_in(), f"config.json: invalid JSON: {expect}",
              _raw_bundle(_writes(text)), partial=True)
          for label, text, expect in (
              ("truncated", '{"ociVersion": "1.0.2"', "Expecting"),
              ("array", "[]", "expected an object, got an array"),
              ("string", '"spec"', "expected an object, got a string"),
              ("null", "null", "expected an object, got null"),
              ("number", "42", "expected an object, got a number"),
              ("trailing-garbage", "{} x", "Extra data"),
              ("deep", "[" * 200_000, "nested too deeply"),
          )),
        Cli("bundle-config-not-utf8", run_in(), "config.json: invalid JSON: not UTF-8 at byte 30",
            _raw_bundle(_writes(b'{"ociVersion": "1.0.2", "x": "\xff\xfe"}'))),
        Cli("bundle-config-huge", run_in(), "config.json: larger than 16 MiB",
            _raw_bundle(_writes(b" " * (big + 1)))),
        Cli("bundle-config-fifo", run_in(), "config.json: not a regular file", _raw_bundle(fifo)),
        Cli("bundle-config-to-dev-zero", run_in(), "config.json: not a regular file",
            _raw_bundle(_symlink("/dev/zero"))),
        Cli("bundle-config-to-passwd", run_in(), "config.json: invalid JSON: ", _raw_bundle(
            _symlink("/etc/passwd")), partial=True),
        Cli("bundle-config-dangling", run_in(), "JSON specification file config.json not found",
            _raw_bundle(_symlink("/nonexistent/config.json"))),
        Cli("bundle-config-loop", run_in(),
            "config.json: cannot read: Too many levels of symbolic links",
            _raw_bundle(loop)),
        Cli("bundle-rootfs-missing", run_in(), "rootfs ({d}/b/rootfs) does not exist",
            _bundle(rootfs=False)),
        Cli("bundle-rootfs-is-a-file", run_in(), "rootfs ({d}/b/rootfs) is not a directory",
            rootfs_file),
        create("bundle-root-absolute-missing", changed(root={"path": "/nonexistent/rootfs"}),
               "rootfs (/nonexistent/rootfs) does not exist"),
        Cli("run-bundle-missing", ("run", "--bundle", "{d}/nope", CID),
            "bundle {d}/nope does not exist or is not a directory"),
        Cli("run-bundle-not-json", ("run", "--detach", "--bundle", "{d}/b", CID),
            "config.json: invalid JSON: ",
            _raw_bundle(_writes("{")), partial=True),
    ]


# config.json fields --------------------------------------------------------------------------------
def _spec_cases() -> list[Cli]:
    res = "linux.resources"
    specs: list[tuple[str, dict[str, Any], str]] = [
        # ociVersion
        ("version-missing", changed(ociVersion=None), "ociVersion must be set"),
        ("version-empty", changed(ociVersion=""), "ociVersion must be set"),
        ("version-number", changed(ociVersion=1), "ociVersion must be set"),
        ("version-garbage", changed(ociVersion="banana"), "ociVersion banana is not a version this runtime "
                                                          "reads (1.0.x to 1.2.x)"),
        ("version-2", changed(ociVersion="2.0.0"),
         "ociVersion 2.0.0 is not a version this runtime reads (1.0.x to 1.2.x)"),
        ("version-1.3", changed(ociVersion="1.3.0"),
         "ociVersion 1.3.0 is not a version this runtime reads (1.0.x to 1.2.x)"),
        ("version-newline", changed(ociVersion="1.0.2\nx"), "ociVersion 1.0.2\\x0ax is not a version this "
                                                            "runtime reads (1.0.x to 1.2.x)"),
        # what a newer spec may ask that the guest's crun (1.8.1) or the VM cannot honour
        ("process-io-priority", changed(ociVersion="1.2.0", process=proc(ioPriority={
            "class": "IOPRIO_CLASS_RT", "priority": 0})),
         "process.ioPriority is not supported: the guest's crun (1.8.1) cannot apply it"),
        ("process-scheduler", changed(ociVersion="1.2.0", process=proc(scheduler={"policy": "SCHED_BATCH"})),
         "process.scheduler is not supported: the guest's crun (1.8.1) cannot apply it"),
        ("intel-rdt", changed(linux=linux(intelRdt={"closID": "gold"})),
         "linux.intelRdt is not supported: the VM has no Intel RDT (resctrl)"),
        ("mount-idmap", changed(ociVersion="1.2.0", mounts=[{"destination": "/x", "type": "tmpfs",
                                                             "options": ["idmap"]}]),
         "mounts[0]: option 'idmap' is not supported: the guest kernel cannot idmap its mounts"),
        # process
        ("process-missing", changed(process=None), "process property must not be empty"),
        ("process-array", changed(process=[]), "process must be an object"),
        ("process-string", changed(process="sh"), "process must be an object"),
        ("args-missing", changed(process=proc(args=None)), "process.args must not be empty"),
        ("args-empty", changed(process=proc(args=[])), "process.args must not be empty"),
        ("args-string", changed(process=proc(args="sh")), "process.args must be an array of strings"),
        ("args-number", changed(process=proc(args=["sh", 1])), "process.args must be an array of strings"),
        ("args-null-item", changed(process=proc(args=[None])), "process.args must be an array of strings"),
        ("args-nul", changed(process=proc(args=["a\0b"])), "process.args[0] contains a NUL byte"),
        ("env-string", changed(process=proc(env="A=1")), "process.env must be an array of strings"),
        ("env-number", changed(process=proc(env=[1])), "process.env must be an array of strings"),
        ("env-no-equals", changed(process=proc(env=["NOPE"])),
         "invalid environment variable 'NOPE': missing '='"),
        ("env-empty-name", changed(process=proc(env=["=v"])),
         "invalid environment variable: name cannot be empty"),
        ("env-nul", changed(process=proc(env=["A=\0"])), "environment variable 'A' contains a NUL byte"),
        ("cwd-relative", changed(process=proc(cwd="tmp")), "process.cwd must be an absolute path, got 'tmp'"),
        ("cwd-empty", changed(process=proc(cwd="")), "process.cwd must be an absolute path, got ''"),
        ("cwd-number", changed(process=proc(cwd=5)), "process.cwd must be a string"),
        ("cwd-nul", changed(process=proc(cwd="/a\0")), "process.cwd contains a NUL byte"),
        ("terminal-string", changed(process=proc(terminal="yes")), "process.terminal must be a boolean"),
        ("console-size", changed(process=proc(consoleSize={"height": -1, "width": 80})),
         "process.consoleSize.height must be an integer from 0 to 4294967295"),
        ("user-array", changed(process=proc(user=[])), "process.user must be an object"),
        ("uid-string", changed(process=proc(user={"uid": "0", "gid": 0})),
         "process.user.uid must be an integer from 0 to 4294967295"),
        ("uid-negative", changed(process=proc(user={"uid": -1, "gid": 0})),
         "process.user.uid must be an integer from 0 to 4294967295"),
        ("uid-huge", changed(process=proc(user={"uid": 2**32, "gid": 0})),
         "process.user.uid must be an integer from 0 to 4294967295"),
        ("uid-float", changed(process=proc(user={"uid": 1.5, "gid": 0})),
         "process.user.uid must be an integer from 0 to 4294967295"),
        ("gid-bool", changed(process=proc(user={"uid": 0, "gid": True})),
         "process.user.gid must be an integer from 0 to 4294967295"),
        ("gids-string", changed(process=proc(user={"uid": 0, "gid": 0, "additionalGids": "1"})),
         "process.user.additionalGids must be an array"),
        ("gids-negative", changed(process=proc(user={"uid": 0, "gid": 0, "additionalGids": [-1]})),
         "process.user.additionalGids[0] must be an integer from 0 to 4294967295"),
        ("umask-string", changed(process=proc(user={"uid": 0, "gid": 0, "umask": "022"})),
         "process.user.umask must be an integer from 0 to 4294967295"),
        ("rlimits-object", changed(process=proc(rlimits={})), "process.rlimits must be an array"),
        ("rlimits-null-item", changed(process=proc(rlimits=[None])), "process.rlimits[0] must not be null"),
        ("rlimit-no-type", changed(process=proc(rlimits=[{"hard": 1, "soft": 1}])),
         "wrong rlimit value: None"),
        ("rlimit-unknown", changed(process=proc(rlimits=[{"type": "RLIMIT_FOO", "hard": 1, "soft": 1}])),
         "wrong rlimit value: RLIMIT_FOO"),
        ("rlimit-soft-above-hard", changed(process=proc(rlimits=[{"type": "RLIMIT_NOFILE", "hard": 1,
                                                                  "soft": 2}])),
         "process.rlimits[0]: the soft limit 2 is above the hard limit 1"),
        ("rlimit-hard-string", changed(process=proc(rlimits=[{"type": "RLIMIT_NOFILE", "hard": "1",
                                                              "soft": 1}])),
         "process.rlimits[0].hard must be an integer from 0 to 18446744073709551615"),
        ("caps-array", changed(process=proc(capabilities=[])), "process.capabilities must be an object"),
        ("caps-string", changed(process=proc(capabilities={"bounding": "CAP_KILL"})),
         "process.capabilities.bounding must be an array of strings"),
        ("caps-unknown", changed(process=proc(capabilities={"effective": ["CAP_FOO"]})),
         "unknown capability 'CAP_FOO'"),
        ("nnp-string", changed(process=proc(noNewPrivileges="true")),
         "process.noNewPrivileges must be a boolean"),
        ("oom-score-range", changed(process=proc(oomScoreAdj=5000)),
         "process.oomScoreAdj must be from -1000 to 1000, got 5000"),
        ("oom-score-string", changed(process=proc(oomScoreAdj="1")),
         "process.oomScoreAdj must be an integer from -2147483648 to 2147483647"),
        ("apparmor-number", changed(process=proc(apparmorProfile=1)),
         "process.apparmorProfile must be a string"),
        # root, hostname
        ("root-missing", changed(root=None), "root.path must be set"),
        ("root-array", changed(root=[]), "root must be an object"),
        ("root-path-number", changed(root={"path": 5}), "root.path must be a string"),
        ("root-path-empty", changed(root={"path": ""}), "root.path must be set"),
        ("root-readonly-string", changed(root={"path": "rootfs", "readonly": "yes"}),
         "root.readonly must be a boolean"),
        ("hostname-number", changed(hostname=5), "hostname must be a string"),
        ("domainname-array", changed(domainname=[]), "domainname must be a string"),
        # mounts
        ("mounts-object", changed(mounts={}), "mounts must be an array"),
        ("mounts-number-item", changed(mounts=[1]), "mounts[0] must be an object"),
        ("mounts-null-item", changed(mounts=[None]), "mounts[0] must not be null"),
        ("mount-no-destination", changed(mounts=[{"type": "tmpfs", "source": "t"}]),
         "mounts[0]: destination must not be empty"),
        ("mount-relative-destination", changed(mounts=[{"destination": "tmp", "type": "tmpfs",
                                                        "source": "t"}]),
         "mounts[0]: destination must be an absolute path, got 'tmp'"),
        ("mount-destination-number", changed(mounts=[{"destination": 5, "type": "tmpfs"}]),
         "mounts[0].destination must be a string"),
        ("mount-destination-nul", changed(mounts=[{"destination": "/a\0", "type": "tmpfs"}]),
         "mounts[0].destination contains a NUL byte"),
        ("mount-type-number", changed(mounts=[{"destination": "/x", "type": 5}]),
         "mounts[0].type must be a string"),
        ("mount-source-array", changed(mounts=[{"destination": "/x", "type": "tmpfs", "source": []}]),
         "mounts[0].source must be a string"),
        ("mount-options-string", changed(mounts=[{"destination": "/x", "type": "tmpfs", "options": "ro"}]),
         "mounts[0].options must be an array of strings"),
        ("mount-options-number", changed(mounts=[{"destination": "/x", "type": "tmpfs", "options": [1]}]),
         "mounts[0].options must be an array of strings"),
        ("mount-no-type", changed(mounts=[{"destination": "/x", "source": "/tmp"}]),
         "mount /x: type '(none)' cannot be passed into the VM (only bind mounts and virtual filesystems)"),
        ("mount-block-device", changed(mounts=[{"destination": "/x", "type": "ext4", "source": "/dev/sda1"}]),
         "mount /x: type 'ext4' cannot be passed into the VM (only bind mounts and virtual filesystems)"),
        ("mount-bind-no-source", changed(mounts=[{"destination": "/x", "type": "bind",
                                                  "options": ["rbind"]}]),
         "mount /x: bind mount without a source"),
        ("mount-bind-missing-source", changed(mounts=[{"destination": "/x", "type": "bind",
                                                       "source": "/nonexistent/src", "options": ["rbind"]}]),
         "mount source /nonexistent/src does not exist"),
        ("mount-uidmappings", changed(mounts=[{"destination": "/x", "type": "tmpfs",
                                               "uidMappings": [{"size": -1}]}]),
         "mounts[0].uidMappings[0].size must be an integer from 0 to 4294967295"),
        # hooks
        ("hooks-array", changed(hooks=[]), "hooks must be an object"),
        ("hooks-kind-object", changed(hooks={"prestart": {}}), "hooks.prestart must be an array"),
        ("hook-no-path", changed(hooks={"poststop": [{"args": []}]}),
         "hooks.poststop[0]: path must not be empty"),
        ("hook-relative-path", changed(hooks={"prestart": [{"path": "hook"}]}),
         "hooks.prestart[0]: path must be an absolute path, got 'hook'"),
        ("hook-path-number", changed(hooks={"createRuntime": [{"path": 5}]}),
         "hooks.createRuntime[0].path must be a string"),
        ("hook-args-string", changed(hooks={"poststart": [{"path": "/bin/true", "args": "x"}]}),
         "hooks.poststart[0].args must be an array of strings"),
        ("hook-env-number", changed(hooks={"prestart": [{"path": "/bin/true", "env": [1]}]}),
         "hooks.prestart[0].env must be an array of strings"),
        ("hook-timeout-string", changed(hooks={"prestart": [{"path": "/bin/true", "timeout": "5"}]}),
         "hooks.prestart[0].timeout must be an integer"),
        ("hook-timeout-zero", changed(hooks={"prestart": [{"path": "/bin/true", "timeout": 0}]}),
         "hooks.prestart[0].timeout must be positive, got 0"),
        ("hook-timeout-negative", changed(hooks={"startContainer": [{"path": "/bin/true", "timeout": -1}]}),
         "hooks.startContainer[0].timeout must be positive, got -1"),
        # annotations
        ("annotations-array", changed(annotations=[]), "annotations must be an object"),
        ("annotation-number", changed(annotations={"a": 1}), "annotations[a] must be a string"),
        ("annotation-null", changed(annotations={"a": None}), "annotations[a] must not be null"),
        ("annotation-object", changed(annotations={"a": {}}), "annotations[a] must be a string"),
        # linux
        ("linux-array", changed(linux=[]), "linux must be an object"),
        ("namespaces-object", changed(linux=linux(namespaces={})), "linux.namespaces must be an array"),
        ("namespace-string-item", changed(linux=linux(namespaces=["pid"])),
         "linux.namespaces[0] must be an object"),
        ("namespace-unknown", changed(linux=linux(namespaces=[{"type": "net"}])),
         "unknown namespace type 'net'"),
        ("namespace-no-type", changed(linux=linux(namespaces=[{}])), "unknown namespace type None"),
        ("namespace-time", changed(linux=linux(namespaces=[{"type": "network"}, {"type": "time"}])),
         "namespace time is not supported: the guest kernel has none"),
        ("namespace-duplicate", changed(linux=linux(namespaces=[{"type": "network"}, {"type": "network"}])),
         "duplicate namespace network"),
        ("namespace-relative-path", changed(linux=linux(namespaces=[{"type": "network", "path": "ns"}])),
         "linux.namespaces[0].path must be an absolute path, got 'ns'"),
        ("namespace-path-number", changed(linux=linux(namespaces=[{"type": "network", "path": 5}])),
         "linux.namespaces[0].path must be a string"),
        ("namespace-path-missing", changed(linux=linux(namespaces=[{"type": "network",
                                                                    "path": "/nonexistent/ns"}])),
         "network namespace /nonexistent/ns: No such file or directory"),
        ("namespace-path-not-ns", changed(linux=linux(namespaces=[{"type": "network",
                                                                   "path": "/etc/hostname"}])),
         "network namespace /etc/hostname: not a namespace"),
        ("namespace-path-wrong-type", changed(linux=linux(namespaces=[
            {"type": "network"}, {"type": "cgroup", "path": "/proc/self/ns/ipc"}])),
         "cgroup namespace /proc/self/ns/ipc: the path is a namespace of type ipc, not cgroup"),
        ("namespace-ipc-path-missing", changed(linux=linux(namespaces=[
            {"type": "network"}, {"type": "ipc", "path": "/nonexistent/ns"}])),
         "ipc namespace /nonexistent/ns: No such file or directory"),
        ("no-network-namespace", changed(linux=linux(namespaces=[{"type": "pid"}])),
         HOST_NETWORK.format(what="container")),
        ("host-network-namespace", changed(linux=linux(namespaces=[{"type": "network",
                                                                    "path": "/proc/self/ns/net"}])),
         HOST_NETWORK.format(what="container")),
        ("sysctl-number", changed(linux=linux(sysctl={"net.ipv4.ip_forward": 1})),
         "linux.sysctl[net.ipv4.ip_forward] must be a string"),
        ("seccomp-array", changed(linux=linux(seccomp=[])), "linux.seccomp must be an object"),
        ("masked-paths-string", changed(linux=linux(maskedPaths="/proc")),
         "linux.maskedPaths must be an array of strings"),
        ("uid-mappings", changed(linux=linux(uidMappings=[{"containerID": 0, "hostID": -5, "size": 1}])),
         "linux.uidMappings[0].hostID must be an integer from 0 to 4294967295"),
        ("cgroups-path-number", changed(linux=linux(cgroupsPath=5)), "linux.cgroupsPath must be a string"),
        # cgroupsPath: the host's cgroups are made from it (kata.cgroups.path)
        ("cgroups-path-dotdot", changed(linux=linux(cgroupsPath="/kubepods/../../etc")),
         "cgroupsPath /kubepods/../../etc: '..' would leave the path it names"),
        ("cgroups-path-root", changed(linux=linux(cgroupsPath="//")),
         "cgroupsPath //: names the root cgroup, which a container may not take over"),
        ("cgroups-path-interface-file", changed(linux=linux(cgroupsPath="/kubepods/cgroup.procs")),
         "cgroupsPath /kubepods/cgroup.procs: cgroup.procs names a cgroup interface file"),
        ("cgroups-path-newline", changed(linux=linux(cgroupsPath="/kubepods/a\nb")),
         "cgroupsPath /kubepods/a\\x0ab: control characters in a component"),
        ("cgroups-path-overhead", changed(linux=linux(cgroupsPath="/kata_overhead/other")),
         "cgroupsPath /kata_overhead/other: kata_overhead is the runtime's own"),
        ("cgroups-path-systemd-slice", changed(linux=linux(cgroupsPath="kubepods:cri-containerd:x")),
         "cgroupsPath kubepods:cri-containerd:x: kubepods is not a slice (.slice)"),
        ("devices-object", changed(linux=linux(devices={})), "linux.devices must be an array"),
        # linux.resources
        ("resources-array", changed(linux=linux(resources=[])), f"{res} must be an object"),
        ("memory-array", changed(linux=linux(resources={"memory": []})), f"{res}.memory must be an object"),
        ("memory-limit-string", changed(linux=linux(resources={"memory": {"limit": "64m"}})),
         f"{res}.memory.limit must be an integer"),
        ("memory-limit-float", changed(linux=linux(resources={"memory": {"limit": 1.5}})),
         f"{res}.memory.limit must be an integer"),
        ("memory-limit-negative", changed(linux=linux(resources={"memory": {"limit": -2}})),
         f"{res}.memory.limit must be -1 (unlimited) or more, got -2"),
        ("memory-reservation-negative", changed(linux=linux(resources={"memory": {"reservation": -5}})),
         f"{res}.memory.reservation must be -1 (unlimited) or more, got -5"),
        ("memory-swap-string", changed(linux=linux(resources={"memory": {"swap": "x"}})),
         f"{res}.memory.swap must be an integer"),
        ("memory-swappiness-negative", changed(linux=linux(resources={"memory": {"swappiness": -1}})),
         f"{res}.memory.swappiness must be an integer from 0 to 18446744073709551615"),
        ("cpu-shares-negative", changed(linux=linux(resources={"cpu": {"shares": -1}})),
         f"{res}.cpu.shares must be an integer from 0 to 18446744073709551615"),
        ("cpu-quota-negative", changed(linux=linux(resources={"cpu": {"quota": -5}})),
         f"{res}.cpu.quota must be -1 (unlimited) or more, got -5"),
        ("cpu-period-negative", changed(linux=linux(resources={"cpu": {"period": -1}})),
         f"{res}.cpu.period must be an integer from 0 to 18446744073709551615"),
        ("cpu-cpus-garbage", changed(linux=linux(resources={"cpu": {"cpus": "all"}})),
         f"{res}.cpu.cpus: 'all' is not a list of numbers and ranges (e.g. 0-3,5)"),
        ("cpu-mems-open-range", changed(linux=linux(resources={"cpu": {"mems": "0-"}})),
         f"{res}.cpu.mems: '0-' is not a list of numbers and ranges (e.g. 0-3,5)"),
        ("cpu-cpus-number", changed(linux=linux(resources={"cpu": {"cpus": 1}})),
         f"{res}.cpu.cpus must be a string"),
        ("pids-limit-string", changed(linux=linux(resources={"pids": {"limit": "x"}})),
         f"{res}.pids.limit must be an integer"),
        ("pids-limit-negative", changed(linux=linux(resources={"pids": {"limit": -3}})),
         f"{res}.pids.limit must be -1 (unlimited) or more, got -3"),
        ("blkio-weight-range", changed(linux=linux(resources={"blockIO": {"weight": 70000}})),
         f"{res}.blockIO.weight must be an integer from 0 to 65535"),
        ("devices-rule-allow-string", changed(linux=linux(resources={"devices": [{"allow": "yes"}]})),
         f"{res}.devices[0].allow must be a boolean"),
        ("hugepages-limit-string", changed(linux=linux(resources={"hugepageLimits": [{"pageSize": "2MB",
                                                                                       "limit": "x"}]})),
         f"{res}.hugepageLimits[0].limit must be an integer from 0 to 18446744073709551615"),
        ("unified-number", changed(linux=linux(resources={"unified": {"memory.max": 1}})),
         f"{res}.unified[memory.max] must be a string"),
        ("network-classid-negative", changed(linux=linux(resources={"network": {"classID": -1}})),
         f"{res}.network.classID must be an integer from 0 to 4294967295"),
        # the CRI's sizing annotations, and Kata's (not enabled by default)
        ("cri-sandbox-memory-garbage", changed(annotations={"io.kubernetes.cri.container-type": "sandbox",
                                                            "io.kubernetes.cri.sandbox-memory": "lots"}),
         "annotation io.kubernetes.cri.sandbox-memory: 'lots' is not a number"),
        ("cri-sandbox-quota-float", changed(annotations={"io.kubernetes.cri.container-type": "sandbox",
                                                         "io.kubernetes.cri.sandbox-cpu-quota": "1.5"}),
         "annotation io.kubernetes.cri.sandbox-cpu-quota: '1.5' is not a number"),
        ("cri-sandbox-period-garbage", changed(annotations={"io.kubernetes.cri.container-type": "sandbox",
                                                            "io.kubernetes.cri.sandbox-cpu-quota": "100000",
                                                            "io.kubernetes.cri.sandbox-cpu-period": "-"}),
         "annotation io.kubernetes.cri.sandbox-cpu-period: '-' is not a number"),
        ("kata-annotation-not-enabled", changed(annotations={f"{KATA_HV}default_memory": "4096"}),
         "annotation io.katacontainers.config.hypervisor.default_memory is not enabled"),
        ("kata-annotation-kernel-not-enabled",
         changed(annotations={"io.katacontainers.config.hypervisor.kernel":
                                                                    "/boot/vmlinuz"}),
         "annotation io.katacontainers.config.hypervisor.kernel is not enabled"),
        ("kata-runtime-annotation-bool", changed(annotations={f"{KATA_RT}disable_new_netns": "maybe"}),
         "annotation io.katacontainers.config.runtime.disable_new_netns: invalid boolean 'maybe'"),
        ("kata-runtime-annotation-model", changed(annotations={
            "io.katacontainers.config.runtime.internetworking_model": "bridge"}),
         "annotation io.katacontainers.config.runtime.internetworking_model: unsupported value 'bridge' "
         "(supported: tcfilter, macvtap, none)"),
    ]
    cases = [create(f"spec-{name}", spec, expect) for name, spec, expect in specs]
    # Annotations a configuration allows (enable_annotations = [".*"]), with values it must refuse.
    for name, key, value, expect in (
        ("default-memory-garbage", "default_memory", "lots", "invalid unsigned integer 'lots'"),
        ("default-memory-tiny", "default_memory", "1", "1 MiB is below the minimum 64"),
        ("default-vcpus-negative", "default_vcpus", "-1", "invalid unsigned integer '-1'"),
        ("path-not-allowed", "path", "/bin/sh", "/bin/sh is not in valid_hypervisor_paths"),
        ("kernel-relative", "kernel", "vmlinuz", "must be an absolute path, got 'vmlinuz'"),
        ("virtiofsd-not-allowed", "virtio_fs_daemon", "/bin/sh",
         "/bin/sh is not in valid_virtio_fs_daemon_paths"),
        ("extra-args-not-json", "virtio_fs_extra_args", "--x", "must be a JSON array of strings, got '--x'"),
        ("machine-unknown", "machine_type", "z80", "unsupported value 'z80' (supported: microvm, q35, pc)"),
        ("shared-fs-unknown", "shared_fs", "nfs",
         "unsupported value 'nfs' (supported: virtio-fs, virtio-9p, none)"),
        ("debug-not-bool", "enable_debug", "yes", "invalid boolean 'yes'"),
    ):
        cases.append(Cli(f"kata-annotation-{name}", ("create", "--bundle", "{d}/b", CID),
                         f"annotation {KATA_HV}{key}: {expect}",
                         _bundle(changed(annotations={KATA_HV + key: value})),
                         globals=("--root", "{root}", "--config", "{permissive}")))
    return cases


# command-line flags --------------------------------------------------------------------------------
def _planted(cid: str, record_id: str | None = None) -> Setup:
    """A container record in --root, as create leaves one, of a container that has stopped (no
    process), for the verbs that check their flags only once they found the container.
    ``record_id``: the record names another container than its directory."""
    def setup(d: Path) -> None:
        (d / "b" / "rootfs").mkdir(parents=True)
        (d / "b" / "config.json").write_text(json.dumps(base_spec()))
        rec = ContainerRecord(id=record_id or cid, bundle=str(d / "b"), rootfs=str(d / "b" / "rootfs"),
                              created="2026-01-01T00:00:00Z", config="")
        store = ContainerStore(d.parent.parent / "root")  # a case's directory is BASE/cases/NAME
        store.reserve(cid)
        (store.dir(cid) / "state.json").write_text(json.dumps(asdict(rec)))
    return setup


def _flag_cases() -> list[Cli]:
    stopped = f"{TAG}-stopped"
    cases = [
        Cli("flag-unknown-global", ("--bogus", "state", CID), "flag provided but not defined: --bogus",
            logged=False),
        Cli("flag-unknown-verb-flag", ("create", "--bogus", "--bundle", "{d}/b", CID),
            "flag provided but not defined: --bogus", _bundle(), logged=False),
        Cli("flag-unknown-verb", ("bogus", CID), "No help topic for 'bogus'", logged=False),
        Cli("flag-extra-argument", ("state", CID, "more"), "unrecognized arguments: more", logged=False),
        Cli("flag-bundle-without-value", ("create", CID, "--bundle"),
            "argument --bundle/-b: expected one argument",
            logged=False),
        Cli("flag-log-format-unknown", ("--log-format", "xml", "state", CID),
            "argument --log-format: invalid choice: 'xml' (choose from 'text', 'json')", logged=False),
        Cli("flag-ps-format-unknown", ("ps", "--format", "xml", CID),
            "argument --format/-f: invalid choice: 'xml' (choose from 'table', 'json')", logged=False),
        Cli("flag-preserve-fds-not-a-number", ("create", "--preserve-fds", "x", CID),
            "argument --preserve-fds: invalid int value: 'x'", logged=False),
        Cli("flag-log-in-missing-dir", ("state", CID), "open {d}/nope/log.json: no such file or directory",
            globals=("--root", "{root}", "--log", "{d}/nope/log.json"), logged=False),
        Cli("flag-config-missing", ("create", "--bundle", "{d}/b", CID),
            "{d}/nope.toml: configuration file not found",
            _bundle(), globals=("--root", "{root}", "--config", "{d}/nope.toml")),
        Cli("flag-config-not-toml", ("create", "--bundle", "{d}/b", CID), "{d}/c.toml: invalid TOML: ",
            _steps(_bundle(), _writes("[hypervisor.qemu\n", "c.toml")), partial=True,
            globals=("--root", "{root}", "--config", "{d}/c.toml")),
        Cli("flag-config-template-among-sandboxes", ("create", "--bundle", "{d}/b", CID),
            "factory.template_path: {state}/vm/template would share {state}/vm, where sandboxes' ids name "
            "the directories", _steps(_bundle(), _template_in_vm_root), partial=True,
            globals=("--root", "{root}", "--config", "{d}/c.toml")),
        Cli("flag-root-is-a-file", ("state", CID), f"container {CID} does not exist",
            _writes("", "f"), globals=("--root", "{d}/f")),
        Cli("flag-root-is-a-file-create", ("create", "--bundle", "{d}/b", CID),
            "mkdir {d}/f: not a directory",
            _steps(_bundle(), _writes("", "f")), globals=("--root", "{d}/f", "--config",
                                                                         "{config}")),
    ]
    for verb in _VERBS:  # the id left out
        more = verb in ("kill", "exec", "ps")
        cases.append(Cli(f"flag-{verb}-without-id", (verb,),
                         f'"{verb}" requires {"a minimum of" if more else "exactly"} 1 argument(s)',
                         logged=False))
    for sig in ("SIGFOO", "65", "-1", "99999999999999999999", "", "9x", "SIG", "rtmin+1", "sig term"):
        cases.append(Cli(f"flag-kill-signal-{sig or 'empty'}", ("kill", CID, "--", sig),
                         f'unknown signal "{sig}"'))
    # the pid file is written last: a place that cannot take it fails before anything is made
    for verb in ("create", "run"):
        detach = ("--detach",) if verb == "run" else ()
        cases += [
            Cli(f"flag-{verb}-pid-file-in-missing-dir", (verb, *detach, "--bundle", "{d}/b", "--pid-file",
                                                         "{d}/nope/pid", CID),
                "open {d}/nope/pid: no such file or directory", _bundle()),
            Cli(f"flag-{verb}-pid-file-is-a-dir", (verb, *detach, "--bundle", "{d}/b", "--pid-file", "{d}",
                                                   CID),
                "open {d}: is a directory", _bundle()),
            Cli(f"flag-{verb}-pid-file-under-a-file", (verb, *detach, "--bundle", "{d}/b", "--pid-file",
                                                       "{d}/b/config.json/pid", CID),
                "open {d}/b/config.json/pid: not a directory", _bundle()),
        ]
    tty = changed(process=proc(terminal=True))
    cases += [
        Cli("flag-tty-without-console-socket", ("create", "--bundle", "{d}/b", CID),
            "cannot allocate tty if runc will detach without setting console socket", _bundle(tty)),
        Cli("flag-console-socket-without-tty", ("create", "--bundle", "{d}/b", "--console-socket", "{d}/s",
                                                CID),
            "cannot use console socket if runc will not detach or allocate tty", _with_socket(_bundle())),
        Cli("flag-console-socket-in-foreground", ("run", "--bundle", "{d}/b", "--console-socket", "{d}/s",
                                                  CID),
            "cannot use console socket if runc will not detach or allocate tty", _with_socket(_bundle(tty))),
        Cli("flag-console-socket-missing", ("create", "--bundle", "{d}/b", "--console-socket", "{d}/nope",
                                            CID),
            "dial unix {d}/nope: connect: no such file or directory", _bundle(tty)),
        Cli("flag-console-socket-not-a-socket", ("create", "--bundle", "{d}/b", "--console-socket",
                                                 "{d}/b/config.json", CID),
            "dial unix {d}/b/config.json: connect: connection refused", _bundle(tty)),
        # exec
        Cli("flag-exec-process-missing", ("exec", "--process", "{d}/nope.json", CID),
            "process file {d}/nope.json "
            "not found"),
        Cli("flag-exec-process-not-json", ("exec", "--process", "{d}/p.json", CID), "p.json: invalid JSON: ",
            _writes("{", "p.json"), partial=True),
        Cli("flag-exec-process-array", ("exec", "--process", "{d}/p.json", CID),
            "p.json: invalid JSON: expected an object, got an array",
            _writes("[]", "p.json")),
        Cli("flag-exec-process-no-args", ("exec", "--process", "{d}/p.json", CID),
            "process.args must not be empty",
            _writes('{"cwd": "/"}', "p.json")),
        Cli("flag-exec-process-relative-cwd", ("exec", "--process", "{d}/p.json", CID),
            "process.cwd must be an absolute path, got 'x'",
            _writes(json.dumps({**PROCESS_JSON, "cwd": "x"}), "p.json")),
        Cli("flag-exec-process-dev-zero", ("exec", "--process", "/dev/zero", CID),
            "zero: not a regular file"),
        Cli("flag-exec-process-is-a-dir", ("exec", "--process", "{d}", CID), ": cannot read: Is a directory",
            partial=True),
        Cli("flag-exec-unknown-container", ("exec", CID, "true"), f"container {CID} does not exist"),
        Cli("flag-exec-pid-file-in-missing-dir", ("exec", "--pid-file", "{d}/nope/pid", CID, "true"),
            "open {d}/nope/pid: no such file or directory"),
        Cli("flag-exec-gids-not-a-number", ("exec", "-g", "x", CID, "true"),
            "argument --additional-gids/-g: invalid int value: 'x'", logged=False),
        Cli("flag-exec-stopped", ("exec", stopped, "true"), "cannot exec in a stopped container",
            _planted(stopped)),
        Cli("flag-exec-no-command", ("exec", stopped), "exec failed: process args cannot be empty",
            _planted(stopped)),
        Cli("flag-exec-user-garbage", ("exec", "--user", "abc", stopped, "true"),
            "parsing abc as UID[:GID]: not numeric", _planted(stopped)),
        Cli("flag-exec-user-gid-garbage", ("exec", "--user", "1:x", stopped, "true"),
            "parsing 1:x as UID[:GID]: not numeric", _planted(stopped)),
        # verbs on a container that is not running
        Cli("flag-start-stopped", ("start", stopped), "cannot start a container that has stopped",
            _planted(stopped)),
        Cli("flag-pause-stopped", ("pause", stopped), "container not running", _planted(stopped)),
        Cli("flag-resume-stopped", ("resume", stopped), "container not paused", _planted(stopped)),
        Cli("flag-kill-stopped", ("kill", stopped, "9"), "container not running", _planted(stopped)),
        Cli("flag-events-stopped", ("events", "--stats", stopped), f"container {stopped} is not running",
            _planted(stopped)),
        Cli("flag-update-stopped", ("update", "--memory", "1g", stopped), "container not running",
            _planted(stopped)),
        Cli("flag-events-interval-garbage", ("events", "--interval", "soon", CID), "invalid duration 'soon'"),
        Cli("flag-state-unknown", ("state", CID), f"container {CID} does not exist"),
        Cli("flag-delete-unknown", ("delete", CID), f"container {CID} does not exist"),
        Cli("flag-start-unknown", ("start", CID), f"container {CID} does not exist"),
        # a planted record that names another container is not trusted
        *(Cli(f"flag-planted-record-{verb[0]}", (*verb, f"{TAG}-planted"),
              f"container {TAG}-planted: unreadable state: the record names container {TAG}-other",
              _planted(f"{TAG}-planted", record_id=f"{TAG}-other"))
          for verb in (("state",), ("delete", "--force"), ("kill",), ("pause",), ("start",))),
    ]
    # update: its values are checked as runc checks them
    for flag, value, expect in (
        ("--memory", "lots", "invalid value for memory: invalid size: 'lots'"),
        ("--memory-swap", "1.2.3g",
         'invalid value for memory-swap: strconv.ParseFloat: parsing "1.2.3": invalid syntax'),
        ("--cpu-quota", "x", 'invalid value for cpu-quota: strconv.ParseInt: parsing "x": invalid syntax'),
        ("--cpu-period", "-1",
         'invalid value for cpu-period: strconv.ParseUint: parsing "-1": invalid syntax'),
        ("--cpu-share", "1e3",
         'invalid value for cpu-share: strconv.ParseUint: parsing "1e3": invalid syntax'),
        ("--pids-limit", "x", 'invalid value "x" for flag -pids-limit: parse error'),
        ("--blkio-weight", "99999", 'invalid value "99999" for flag -blkio-weight: value out of range'),
        ("--l3-cache-schema", "L3:0=f", "Intel RDT/CAT: l3 cache schema is not enabled"),
        ("--resources", "{d}/nope.json", "open {d}/nope.json: no such file or directory"),
        ("--resources", "/dev/zero", "read /dev/zero: not a regular file"),
        ("--resources", "{d}", "open {d}: is a directory"),
    ):
        label = value.rsplit("/", 1)[-1].replace(".", "-") or "dir"
        cases.append(Cli(f"flag-update{flag}-{label}", ("update", flag, value, CID), expect))
    cases += [
        Cli("flag-update-resources-not-json", ("update", "--resources", "-", CID), "invalid JSON: ",
            stdin="{",
            partial=True),
        Cli("flag-update-resources-empty", ("update", "--resources", "-", CID), "EOF", stdin=""),
        Cli("flag-update-resources-array", ("update", "--resources", "-", CID),
            "json: cannot unmarshal array into Go value of type specs.LinuxResources", stdin="[]"),
        Cli("flag-update-resources-type", ("update", "--resources", "-", CID),
            "json: cannot unmarshal string into Go struct field LinuxMemory.memory.limit of type int64",
            stdin='{"memory": {"limit": "1g"}}'),
    ]
    return cases


def _with_socket(setup: Setup) -> Setup:
    def both(d: Path) -> None:
        setup(d)
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(d / "s"))
        s.close()  # the path stays: enough for the check, which must not connect
    return both


def _template_in_vm_root(d: Path) -> None:
    """{d}/c.toml: the session's configuration with Kata's template_path, which a sandbox named
    "template" would share (under the session's VM root)."""
    data = dump_config(load_config(Path(os.environ["KATA_CONF_FILE"])))
    del data["meta"]
    data["factory"]["template_path"] = str(paths.VM_ROOT / "template")
    (d / "c.toml").write_text(dumps(data))


ALL_CLI = [*_id_cases(), *_bundle_cases(), *_spec_cases(), *_flag_cases()]
# Every fourth case runs the installed command; the odd bytes in ids are enough in-process.
SUBPROCESS = {c.name for i, c in enumerate(ALL_CLI) if i % 4 == 0 and not c.name.startswith("id-byte-")}


# ---- the shim's requests --------------------------------------------------------------------------
Request = Callable[[Path], Any]


@dataclass(frozen=True)
class ShimCall:
    """TaskService.METHOD(request(d)) must fail with CODE and the one-line EXPECT ("{d}": the case's
    directory, where ``setup`` makes a bundle in {d}/b)."""

    name: str
    method: str
    request: Request
    code: ttrpc.Code
    expect: str
    setup: Setup | None = None
    partial: bool = False


def _json(value: Any) -> AnyPb:
    return AnyPb(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                 value=value if isinstance(value, bytes) else json.dumps(value).encode())


def _create(cid: str = CID, **fields: Any) -> Request:
    return lambda d: pb.CreateTaskRequest(id=cid, bundle=str(d / "b"), **fields)


def _request(kind: Any, **fields: Any) -> Request:
    """A request of ``kind`` with these fields (the case's directory does not matter to it)."""
    return lambda _d: kind(**fields)


def _options(value: bytes) -> AnyPb:
    return AnyPb(type_url="runtimeoptions.v1.Options", value=value)


_TYPES = {name: m.request_type for name, m in TaskService(PodTasks("default", None), lambda: None,
                                                          None).methods().items()}
_WITH_EXEC = sorted(n for n, t in _TYPES.items() if "exec_id" in t.DESCRIPTOR.fields_by_name)
_BAD_IDS = ["../x", "", "caf\u00e9", "a/b", "x" * 129, "a b", ".."]


def _shim_calls() -> list[ShimCall]:
    calls = []
    for i, name in enumerate(sorted(_TYPES)):
        bad = _BAD_IDS[i % len(_BAD_IDS)]
        expect = "container id cannot be empty" if not bad else f"invalid id format: {shown(bad)}"
        calls.append(ShimCall(f"shim-{name}-bad-id", name, _request(_TYPES[name], id=bad),
                              ttrpc.Code.INVALID_ARGUMENT, expect, partial=len(bad) > 80))
    for i, name in enumerate(_WITH_EXEC):
        bad = _BAD_IDS[(i + 3) % len(_BAD_IDS)] or "../e"
        calls.append(ShimCall(f"shim-{name}-bad-exec-id", name,
                              _request(_TYPES[name], id=CID, exec_id=bad),
                              ttrpc.Code.INVALID_ARGUMENT, f"invalid id format: {shown(bad)}",
                              partial=len(bad) > 80))
    unknown = f"task {CID}: not found"
    for name, extra in (("State", {}), ("Start", {}), ("Delete", {}), ("Pids", {}), ("Pause", {}), ("Resume",
                                                                                                    {}),
                        ("Kill", {"signal": 9}), ("ResizePty", {"width": 80, "height": 24}),
                        ("CloseIO", {"stdin": True}), ("Wait", {}), ("Stats", {}),
                        ("Exec", {"exec_id": "e1", "spec": _json(PROCESS_JSON)}),
                        ("Update", {"resources": _json({"memory": {"limit": 1 << 30}})})):
        calls.append(ShimCall(f"shim-{name}-unknown-task", name, _request(_TYPES[name], id=CID, **extra),
                              ttrpc.Code.NOT_FOUND, unknown))
    for label, spec, expect in (
        ("not-json", b"{", "exec process: not JSON: Expecting property name enclosed in double quotes: line "
                           "1 "
                           "column 2 (char 1)"),
        ("array", b"[]", "exec process: not a JSON object"),
        ("no-args", {"cwd": "/"}, "exec process.args must not be empty"),
        ("relative-cwd", {**PROCESS_JSON, "cwd": "tmp"},
         "exec process.cwd must be an absolute path, got 'tmp'"),
        ("env-no-equals", {**PROCESS_JSON, "env": ["X"]}, "invalid environment variable 'X': missing '='"),
        ("uid-string", {**PROCESS_JSON, "user": {"uid": "0"}},
         "exec process.user.uid must be an integer from 0 to 4294967295"),
        ("unknown-rlimit", {**PROCESS_JSON, "rlimits": [{"type": "RLIMIT_X", "soft": 1, "hard": 1}]},
         "wrong rlimit value: RLIMIT_X"),
    ):
        calls.append(ShimCall(f"shim-Exec-spec-{label}", "Exec",
                              _request(pb.ExecProcessRequest, id=CID, exec_id="e1", spec=_json(spec)),
                              ttrpc.Code.INVALID_ARGUMENT, expect))
    for label, resources, expect in (
        ("not-json", b"x", "resources: not JSON: Expecting value: line 1 column 1 (char 0)"),
        ("array", b"[1]", "resources: not a JSON object"),
        ("limit-string", {"memory": {"limit": "1g"}}, "resources.memory.limit must be an integer"),
        ("limit-negative", {"memory": {"limit": -5}},
         "resources.memory.limit must be -1 (unlimited) or more, got -5"),
        ("cpus-garbage", {"cpu": {"cpus": "all"}},
         "resources.cpu.cpus: 'all' is not a list of numbers and ranges "
                                                   "(e.g. 0-3,5)"),
        ("pids-string", {"pids": {"limit": "x"}}, "resources.pids.limit must be an integer"),
    ):
        calls.append(ShimCall(f"shim-Update-{label}", "Update",
                              _request(pb.UpdateTaskRequest, id=CID, resources=_json(resources)),
                              ttrpc.Code.INVALID_ARGUMENT, expect))
    sandbox = {"io.kubernetes.cri.container-type": "sandbox"}
    cri_container = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "other"}
    bogus_fs = [mount_pb2.Mount(type=f"{TAG}fs", source="none")]
    calls += [
        ShimCall("shim-Create-checkpoint", "Create", _create(checkpoint="/x"), ttrpc.Code.UNIMPLEMENTED,
                 "checkpoint and restore are not supported", _bundle()),
        ShimCall("shim-Create-options-garbage", "Create", _create(options=_options(b"\xff\xff\xff")),
                 ttrpc.Code.INVALID_ARGUMENT, "runtime options: ", _bundle(), partial=True),
        ShimCall("shim-Create-options-missing-config", "Create", _create(options=_options(
            runtimeoptions.Options(config_path="/nonexistent/kata.toml").SerializeToString())),
            ttrpc.Code.UNKNOWN, "/nonexistent/kata.toml: configuration file not found", _bundle()),
        ShimCall("shim-Create-too-long-for-a-vm", "Create", _create("v" * 70), ttrpc.Code.INVALID_ARGUMENT,
                 f"invalid id format: {'v' * 70}: longer than ", _bundle(), partial=True),
        ShimCall("shim-Create-bundle-missing", "Create", _create(), ttrpc.Code.UNKNOWN,
                 "bundle {d}/b does not exist or is not a directory"),
        ShimCall("shim-Create-config-not-json", "Create", _create(), ttrpc.Code.UNKNOWN,
                 "config.json: invalid JSON: ",
                 _raw_bundle(_writes("{")), partial=True),
        ShimCall("shim-Create-uid-string", "Create", _create(), ttrpc.Code.UNKNOWN,
                 "process.user.uid must be an integer from 0 to 4294967295",
                 _bundle(changed(process=proc(user={"uid": "0", "gid": 0})))),
        ShimCall("shim-Create-time-namespace", "Create", _create(), ttrpc.Code.UNKNOWN,
                 "namespace time is not supported: the guest kernel has none",
                 _bundle(changed(linux=linux(namespaces=[{"type": "network"}, {"type": "time"}])))),
        ShimCall("shim-Create-bind-source-missing", "Create", _create(), ttrpc.Code.UNKNOWN,
                 "mount source /nonexistent/src does not exist",
                 _bundle(changed(mounts=[{"destination": "/x", "type": "bind", "source": "/nonexistent/src",
                                          "options": ["rbind"]}]))),
        ShimCall("shim-Create-cri-pod-elsewhere", "Create", _create(), ttrpc.Code.FAILED_PRECONDITION,
                 f"container {CID}: pod other is not in this shim",
                 _bundle(changed(annotations=cri_container))),
        ShimCall("shim-Create-cri-sandbox-id-invalid", "Create", _create(), ttrpc.Code.UNKNOWN,
                 "annotation io.kubernetes.cri.sandbox-id: invalid id format: ../pod",
                 _bundle(changed(annotations={**cri_container, "io.kubernetes.cri.sandbox-id": "../pod"}))),
        ShimCall("shim-Create-cri-sandbox-memory", "Create", _create(), ttrpc.Code.UNKNOWN,
                 "annotation io.kubernetes.cri.sandbox-memory: '64Mi' is not a number",
                 _bundle(changed(annotations={**sandbox, "io.kubernetes.cri.sandbox-memory": "64Mi"}))),
        ShimCall("shim-Create-cri-sandbox-quota", "Create", _create(), ttrpc.Code.UNKNOWN,
                 "annotation io.kubernetes.cri.sandbox-cpu-quota: 'half' is not a number",
                 _bundle(changed(annotations={**sandbox, "io.kubernetes.cri.sandbox-cpu-quota": "half"}))),
        ShimCall("shim-Create-kata-annotation", "Create", _create(), ttrpc.Code.UNKNOWN,
                 "annotation io.katacontainers.config.hypervisor.image is not enabled",
                 _bundle(changed(annotations={"io.katacontainers.config.hypervisor.image": "/x.img"}))),
        ShimCall("shim-Create-host-network", "Create", _create(), ttrpc.Code.UNKNOWN,
                 HOST_NETWORK.format(what="container"), _bundle(changed(linux=linux(namespaces=[])))),
        ShimCall("shim-Create-rootfs-unknown-fs", "Create", _create(rootfs=bogus_fs), ttrpc.Code.UNKNOWN,
                 f"mounting the rootfs: mount {TAG}fs none on {{d}}/b/rootfs: No such device", _bundle()),
        ShimCall("shim-Create-rootfs-options-too-long", "Create", _create(rootfs=[mount_pb2.Mount(
            type="tmpfs", source="tmpfs", options=["size=" + "1" * 5000])]), ttrpc.Code.UNKNOWN,
            "rootfs tmpfs mount: 5005 bytes of options exceed one page", _bundle()),
        # mounted first (the spec is read from the bundle), and unmounted again when the spec is bad
        ShimCall("shim-Create-rootfs-mounted-then-bad-spec", "Create", _create(rootfs=[mount_pb2.Mount(
            type="tmpfs", source="tmpfs")]), ttrpc.Code.UNKNOWN, "process.args must not be empty",
            _bundle(changed(process=proc(args=[])))),
    ]
    return calls


SHIM_CALLS = _shim_calls()


# ---- the shim's commands (containerd runs them in the bundle) ----------------------------------
@dataclass(frozen=True)
class ShimCommand:
    name: str
    args: tuple[str, ...]
    expect: str
    setup: Setup | None = None
    stdin: bytes = b""
    partial: bool = False


def _shim_commands() -> list[ShimCommand]:
    ns, addr = ("-namespace", "k8s.io"), ("-address", "{d}/containerd.sock", "-publish-binary", "/bin/false")
    pod = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "../pod"}
    return [
        *(ShimCommand(f"shim-{action}-id-{label}", (*ns, *addr, "-id", cid, action), expect, _bundle())
          for action in ("start", "delete")
          for label, cid, expect in (("dotdot", "../x", "invalid id format: ../x"),
                                     ("empty", "", f"{action} needs -id and -namespace"),
                                     ("non-ascii", "caf\u00e9", "invalid id format: caf\\xe9"),
                                     ("slash", "a/b", "invalid id format: a/b"))),
        ShimCommand("shim-start-no-namespace", (*addr, "-id", CID, "start"),
                    "start needs -id and -namespace"),
        ShimCommand("shim-start-bad-namespace", ("-namespace", "a/b", *addr, "-id", CID, "start"),
                    "namespace: invalid id format: a/b"),
        ShimCommand("shim-delete-bad-namespace", ("-namespace", "../ns", *addr, "-id", CID, "delete"),
                    "namespace: invalid id format: ../ns"),
        ShimCommand("shim-unknown-flag", ("-bogus", *ns, "-id", CID, "start"),
                    "flag provided but not defined: -bogus"),
        ShimCommand("shim-unknown-action", (*ns, "-id", CID, "destroy"),
                    "argument action: invalid choice: 'destroy' (choose from 'start', 'delete')"),
        ShimCommand("shim-start-config-not-json", (*ns, *addr, "-id", CID, "start"), "config.json: Expecting",
                    _raw_bundle(_writes("{")), partial=True),
        ShimCommand("shim-start-config-fifo", (*ns, *addr, "-id", CID, "start"),
                    "config.json: not a regular file", _raw_bundle(os.mkfifo), partial=True),
        ShimCommand("shim-start-cri-sandbox-id-invalid", (*ns, *addr, "-id", CID, "start"),
                    "annotation io.kubernetes.cri.sandbox-id: invalid id format: ../pod",
                    _bundle(changed(annotations=pod))),
        ShimCommand("shim-start-options-garbage", (*ns, *addr, "-id", CID, "start"),
                    "runtime options on stdin: ",
                    _bundle(), stdin=b"\x0a\xff\xff\xff\xff", partial=True),
    ]


SHIM_COMMANDS = _shim_commands()


# ---- running the cases ----------------------------------------------------------------------------
def _fill(text: str, d: Path, world: World) -> str:
    for key, value in (("{d}", d), ("{root}", world.root), ("{config}", world.config),
                       ("{permissive}", world.permissive), ("{state}", world.state)):
        text = text.replace(key, str(value))
    return text


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str
    log: Path | None = None


def _in_process(argv: list[str], stdin: str) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    saved, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(argv)
    finally:
        sys.stdin = saved
    return Outcome(code, out.getvalue(), err.getvalue())


def _subprocess(argv: list[str], stdin: str, world: World, d: Path, name: str) -> Outcome:
    """The installed kata-runtime, as containerd's runc shim runs it (--log, JSON), in the case's
    directory (the bundle's, for containerd)."""
    log = world.base / "logs" / f"{name}.json"
    log.parent.mkdir(exist_ok=True)
    has_log = "--log" in argv[: argv.index("--") if "--" in argv else len(argv)]
    full = [runtime_bin(), *([] if has_log else ["--log", str(log), "--log-format", "json"]), *argv]
    proc = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=60, cwd=d,
                          env=world.env())
    return Outcome(proc.returncode, proc.stdout, proc.stderr, None if has_log else log)


def _check_line(line: str, prefix: str, expect: str, partial: bool) -> None:
    assert line.startswith(prefix), line
    if partial:
        assert expect in line, f"{expect!r} not in {line!r}"
    else:
        assert line == prefix + expect


@pytest.fixture
def case_dir(world: World, request: pytest.FixtureRequest) -> Iterator[Path]:
    """The case's directory; afterwards, it and whatever its setup planted under --root go."""
    # Short: a case's unix socket must fit in sun_path.
    name = request.node.callspec.id if hasattr(request.node, "callspec") else request.node.name
    d = world.cases / "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    d.mkdir()
    planted_before = set(os.listdir(world.root))
    yield d
    for name in set(os.listdir(world.root)) - planted_before:
        shutil.rmtree(world.root / name)
    shutil.rmtree(d)


@pytest.mark.parametrize("case", ALL_CLI, ids=[c.name for c in ALL_CLI])
def test_kata_runtime_refuses_it_in_one_line_and_leaves_nothing(case: Cli, world: World,
                                                                case_dir: Path) -> None:
    if case.setup is not None:
        case.setup(case_dir)
    snapshot = Snapshot(world, case_dir)
    globals_ = case.globals if case.globals is not None else ("--root", "{root}", "--config", "{config}")
    argv = [_fill(a, case_dir, world) for a in (*globals_, *case.argv)]
    if case.name in SUBPROCESS:
        outcome = _subprocess(argv, case.stdin, world, case_dir, case.name)
    else:
        outcome = _in_process(argv, case.stdin)
    assert outcome.code != 0, outcome
    assert outcome.stdout == ""
    line = _one_line(outcome.stderr)
    _check_line(line, "kata-runtime: ", _fill(case.expect, case_dir, world), case.partial)
    if outcome.log is not None and case.logged:
        # containerd's runc shim shows the log's last error: the same line.
        errors = [json.loads(x) for x in outcome.log.read_text().splitlines() if '"error"' in x]
        assert errors and errors[-1]["msg"] == line.removeprefix("kata-runtime: ")
    snapshot.assert_nothing_left()


@pytest.mark.parametrize("case", SHIM_CALLS, ids=[c.name for c in SHIM_CALLS])
def test_the_shim_answers_it_with_an_error_status_in_one_line(case: ShimCall, world: World,
                                                             case_dir: Path) -> None:
    if case.setup is not None:
        case.setup(case_dir)
    snapshot = Snapshot(world, case_dir)
    service = TaskService(PodTasks("default", None), on_shutdown=lambda: None, default_config=world.config)
    with pytest.raises(ttrpc.TTRPCError) as failure:
        service.methods()[case.method].handler(None, case.request(case_dir))  # type: ignore[arg-type]
    assert failure.value.code == case.code, failure.value
    _check_line(_one_line(failure.value.message), "", _fill(case.expect, case_dir, world), case.partial)
    snapshot.assert_nothing_left()


@pytest.mark.parametrize("case", SHIM_COMMANDS, ids=[c.name for c in SHIM_COMMANDS])
def test_the_shim_command_refuses_it_in_one_line(case: ShimCommand, world: World, case_dir: Path) -> None:
    """Run in the bundle, as containerd does; the pod's socket, named by a hash of containerd's
    address, the namespace and the id, is never made."""
    if case.setup is not None:
        case.setup(case_dir)
    cwd = case_dir / "b" if (case_dir / "b").is_dir() else case_dir
    snapshot = Snapshot(world, case_dir)
    args = [_fill(a, case_dir, world) for a in case.args]
    flags = dict(zip(args, args[1:], strict=False))
    pod_socket = address.socket_path(*(flags.get(f, "") for f in ("-address", "-namespace", "-id")))
    name = "containerd-shim-kata-v2"
    shim = shutil.which(name) or str(Path(sys.prefix) / "bin" / name)
    proc = subprocess.run([shim, *args], input=case.stdin, capture_output=True, timeout=60, cwd=cwd,
                          env=world.env())
    assert proc.returncode == 1 and proc.stdout == b"", proc
    line = _one_line(proc.stderr.decode())
    _check_line(line, f"{name}: ", _fill(case.expect, case_dir, world), case.partial)
    assert not pod_socket.exists()
    snapshot.assert_nothing_left()


def test_the_corpus_is_big_enough() -> None:
    cases = len(ALL_CLI) + len(SHIM_CALLS) + len(SHIM_COMMANDS)
    assert cases >= 200, cases
    names = [c.name for c in ALL_CLI] + [c.name for c in SHIM_CALLS] + [c.name for c in SHIM_COMMANDS]
    assert len(set(names)) == len(names), "case names must be unique"


# ---- the controls: the base input gets past every check --------------------------------------------
def test_the_base_bundle_gets_past_every_check(world: World, case_dir: Path) -> None:
    """Without its defect, a case's input would get as far as making the container: the tripwire
    in this process; in a real kata-runtime, the QEMU that does not exist, after which everything it
    had made is taken down again."""
    _bundle()(case_dir)
    argv = ["--root", str(world.root), "--config", str(world.config), "create", "--bundle",
            str(case_dir / "b"), CID]
    outcome = _in_process(argv, "")
    tripped = "kata-runtime: internal error: Tripwire: got past every check"
    assert _one_line(outcome.stderr).startswith(tripped)
    assert os.listdir(world.root) == [] and _ours(world) == []
    outcome = _subprocess(argv, "", world, case_dir, "control")
    assert outcome.code == 1
    assert _one_line(outcome.stderr).startswith(f"kata-runtime: hypervisor {NOWHERE}/qemu does not exist")
    assert os.listdir(world.root) == [] and _ours(world) == []
    for top in (world.state / "sbs", world.state / "vm", world.shared):
        assert not top.exists() or os.listdir(top) == [], top


def test_a_failed_create_takes_its_cgroups_back(world: World, case_dir: Path) -> None:
    """The base bundle with a cgroupsPath: its cgroups are made before the VM would boot, and go
    again with everything else when the QEMU that does not exist fails the create."""
    top = f"kata-bad-input-{uuid.uuid4().hex[:8]}"
    _bundle(changed(linux=linux(cgroupsPath=f"/{top}/pod/{CID}")))(case_dir)
    argv = ["--root", str(world.root), "--config", str(world.config), "create", "--bundle",
            str(case_dir / "b"), CID]
    outcome = _subprocess(argv, "", world, case_dir, "cgroups")
    assert _one_line(outcome.stderr).startswith(f"kata-runtime: hypervisor {NOWHERE}/qemu does not exist")
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{top}")) and not list(Path("/sys/fs/cgroup").glob(top))


def test_the_shims_base_request_gets_past_every_check(world: World, case_dir: Path) -> None:
    _bundle()(case_dir)
    service = TaskService(PodTasks("default", None), on_shutdown=lambda: None, default_config=world.config)
    with pytest.raises(ttrpc.TTRPCError) as failure:
        service.methods()["Create"].handler(None, _create()(case_dir))  # type: ignore[arg-type]
    assert failure.value.code == ttrpc.Code.INTERNAL
    assert failure.value.message.startswith("Tripwire: got past every check")
    assert _ours(world) == []


# ---- finding 3: ids steered paths ----------------------------------------------------------------
# A process of no container's, the marker its record's hook would leave, and the record.
Bystander = tuple[subprocess.Popen[bytes], Path, dict[str, Any]]


@pytest.fixture
def bystander(world: World, case_dir: Path) -> Iterator[Bystander]:
    """A process that is no container's, and a record that names it with a poststop hook that would
    leave a marker: what a planted (or foreign) state.json could make delete kill and run."""
    from kata.utils.process import ProcessId

    sleeper = subprocess.Popen(["sleep", "300"])
    marker = case_dir / "hook-ran"
    (case_dir / "b" / "rootfs").mkdir(parents=True)
    spec = changed(hooks={"poststop": [{"path": "/bin/touch", "args": ["touch", str(marker)]}]})
    (case_dir / "b" / "config.json").write_text(json.dumps(spec))
    ident = ProcessId.of(sleeper.pid)
    assert ident is not None
    record = asdict(ContainerRecord(id="", bundle=str(case_dir / "b"), rootfs=str(case_dir / "b" / "rootfs"),
                                    created="2026-01-01T00:00:00Z", config="", status="running",
                                    pid=ident.pid, pid_start=ident.start_time))
    try:
        yield sleeper, marker, record
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("root,argv", [
    ("root", ("delete", "--force", "../victim")),
    ("root", ("delete", "../victim")),
    ("root", ("kill", "../victim", "9")),
    ("root/sub", ("delete", "--force", "../../victim")),
])
def test_an_id_never_reaches_outside_root(world: World, case_dir: Path, root: str, argv: tuple[str, ...],
                                          bystander: Bystander) -> None:
    """The directory an id would name outside --root, with a record in it, is neither read nor
    removed: its process lives on and its hook does not run."""
    sleeper, marker, record = bystander
    cid = next(a for a in argv if "victim" in a)
    victim = world.base / "victim"  # what ROOT/ID resolves to
    victim.mkdir()
    (victim / "state.json").write_text(json.dumps({**record, "id": cid}))
    try:
        outcome = _subprocess(["--root", str(world.base / root), *argv], "", world, case_dir, "victim")
        assert outcome.code == 1 and _one_line(outcome.stderr) == f"kata-runtime: invalid id format: {cid}"
        assert sleeper.poll() is None and not marker.exists() and (victim / "state.json").exists()
        assert not (world.base / "root" / "sub").exists()
    finally:
        shutil.rmtree(victim)


@pytest.mark.parametrize("argv", [("delete", "--force"), ("kill",), ("delete",)])
def test_a_record_naming_another_container_is_not_acted_on(world: World, argv: tuple[str, ...],
                                                           bystander: Bystander) -> None:
    """A state.json planted in (or copied to) a container's directory that names another container
    is not trusted: nothing is killed, no hook runs."""
    sleeper, marker, record = bystander
    cid = f"{TAG}-planted"
    ContainerStore(world.root).reserve(cid)
    (world.root / cid / "state.json").write_text(json.dumps({**record, "id": f"{TAG}-elsewhere"}))
    outcome = _in_process(["--root", str(world.root), *argv, cid], "")
    assert outcome.code == 1
    assert _one_line(outcome.stderr) == (f"kata-runtime: container {cid}: unreadable state: the record names "
                                         f"container {TAG}-elsewhere")
    assert sleeper.poll() is None and not marker.exists()
