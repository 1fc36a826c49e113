"""kata.oci.spec: bundle loading and validation, against what docker/containerd really write."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from kata.oci.spec import (
    Bundle,
    Mount,
    Namespace,
    OCIError,
    Resources,
    linux_resources,
    load_bundle,
    load_process,
    parse_process,
)
from kata.utils.files import MAX_JSON_BYTES
from tests.conftest import minimal_spec

REFERENCE = Path("/work/shared/reference")


def reference(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((REFERENCE / name).read_text())
    return data


def make_bundle(tmp_path: Path, spec: dict[str, Any], rootfs: str = "rootfs") -> Path:
    """Write ``spec`` as a bundle; absolute placeholders from the reference files become tmp paths."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / rootfs).mkdir(parents=True, exist_ok=True)
    root = spec.get("root")
    if isinstance(root, dict) and isinstance(root.get("path"), str) and root["path"].startswith("<"):
        root["path"] = str(bundle / rootfs)
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


@pytest.mark.parametrize(
    "name", ["docker-create-config.json", "docker-bridge-create-config.json", "ctr-create-config.json"]
)
def test_reference_bundles_load(tmp_path: Path, name: str) -> None:
    b = load_bundle(make_bundle(tmp_path, reference(name)))
    assert b.root_path.is_dir()
    assert b.process is not None and b.process.args
    assert {ns.type for ns in b.namespaces} == {"mount", "network", "uts", "pid", "ipc"}
    assert all(ns.path is None for ns in b.namespaces)


def test_docker_accessors(tmp_path: Path) -> None:
    b = load_bundle(make_bundle(tmp_path, reference("docker-create-config.json")))
    proc = b.process
    assert proc is not None
    assert proc.args == ("sleep", "1000")
    assert proc.cwd == "/"
    assert proc.terminal is False
    assert proc.user.uid == 0 and proc.user.additional_gids == (0,)
    assert "HOSTNAME=5a142b35d609" in proc.env
    assert b.hostname == "5a142b35d609"
    assert b.root_readonly is False
    binds = [m for m in b.mounts if m.is_bind]
    assert [m.destination for m in binds] == ["/etc/resolv.conf", "/etc/hostname", "/etc/hosts"]
    assert b.mounts[0] == Mount("/proc", "proc", "proc", ("nosuid", "noexec", "nodev"))
    assert b.hooks.prestart == ()
    assert b.resources == Resources()
    assert dict(b.annotations) == {}


def test_docker_bridge_hooks(tmp_path: Path) -> None:
    b = load_bundle(make_bundle(tmp_path, reference("docker-bridge-create-config.json")))
    (hook,) = b.hooks.prestart
    assert hook.path == "/proc/5714/exe"
    assert hook.args[0] == "libnetwork-setkey"
    assert b.hooks.poststop == ()


def test_relative_root_resolved_against_bundle(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, minimal_spec())
    b = load_bundle(bundle)
    assert b.root_path == bundle / "rootfs"
    assert b.root_path.is_absolute()


def test_relative_bundle_path_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_bundle(tmp_path, minimal_spec())
    monkeypatch.chdir(tmp_path)
    b = load_bundle(Path("bundle"))
    assert b.path.is_absolute()
    assert b.root_path == tmp_path / "bundle" / "rootfs"


def test_readonly_root(tmp_path: Path) -> None:
    b = load_bundle(make_bundle(tmp_path, minimal_spec(root={"path": "rootfs", "readonly": True})))
    assert b.root_readonly is True


def test_missing_bundle_dir(tmp_path: Path) -> None:
    with pytest.raises(OCIError, match="does not exist"):
        load_bundle(tmp_path / "nope")


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(OCIError) as e:
        load_bundle(tmp_path)
    assert str(e.value) == "JSON specification file config.json not found"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "config.json: invalid JSON: "),
        ("[1, 2]", "config.json: invalid JSON: expected an object, got an array"),
        ("", "config.json: invalid JSON: "),
    ],
)
def test_bad_json(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(OCIError) as e:
        load_bundle(tmp_path)
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ociVersion": None}, "ociVersion must be set"),
        ({"ociVersion": ""}, "ociVersion must be set"),
        ({"process": None}, "process property must not be empty"),
        ({"process": {"args": []}}, "process.args must not be empty"),
        ({"process": {"cwd": "/"}}, "process.args must not be empty"),
        ({"process": {"args": ["a", 1]}}, "process.args must be an array of strings"),
        ({"process": {"args": ["a"], "cwd": "tmp"}}, "process.cwd must be an absolute path, got 'tmp'"),
        ({"process": {"args": ["a"], "env": "X=1"}}, "process.env must be an array"),
        ({"process": {"args": ["a"], "terminal": "yes"}}, "process.terminal must be a boolean"),
        ({"process": {"args": ["a"], "user": {"uid": "0"}}}, "process.user.uid must be an integer"),
        ({"process": "sh"}, "process must be an object"),
        ({"root": None}, "root.path must be set"),
        ({"root": {"path": ""}}, "root.path must be set"),
        ({"root": {"path": "rootfs", "readonly": 1}}, "root.readonly must be a boolean"),
        ({"mounts": {}}, "mounts must be an array"),
        ({"mounts": [{"type": "tmpfs"}]}, "mounts[0]: destination must not be empty"),
        ({"mounts": [{"destination": ""}]}, "mounts[0]: destination must not be empty"),
        ({"mounts": [{"destination": "/x", "options": "ro"}]}, "mounts[0].options must be an array"),
        ({"linux": {"namespaces": [{"type": "net"}]}}, "unknown namespace type 'net'"),
        ({"linux": {"namespaces": [{}]}}, "unknown namespace type None"),
        ({"linux": {"namespaces": [{"type": "pid"}, {"type": "pid"}]}}, "duplicate namespace pid"),
        ({"linux": {"resources": {"memory": {"limit": "64m"}}}}, "linux.resources.memory.limit must be"),
        ({"linux": {"resources": {"cpu": {"quota": 1.5}}}}, "linux.resources.cpu.quota must be"),
        ({"linux": {"resources": {"cpu": {"period": True}}}}, "linux.resources.cpu.period must be"),
        ({"linux": {"resources": {"cpu": {"cpus": 1}}}}, "linux.resources.cpu.cpus must be a string"),
        ({"linux": []}, "linux must be an object"),
        ({"hooks": {"prestart": [{"args": []}]}}, "hooks.prestart[0]: path must not be empty"),
        ({"hooks": {"poststop": {}}}, "hooks.poststop must be an array"),
        ({"annotations": {"a": 1}}, "annotations[a] must be a string"),
        ({"hostname": 5}, "hostname must be a string"),
        # What runc's Go types refuse, and what the guest's crun would refuse only after the VM booted.
        ({"ociVersion": "banana"}, "ociVersion banana is not a version this runtime reads"),
        ({"ociVersion": "2.0.0"}, "ociVersion 2.0.0 is not a version"),
        ({"ociVersion": "1.3.0"}, "ociVersion 1.3.0 is not a version this runtime reads (1.0.x to 1.2.x)"),
        ({"ociVersion": "1.2.0", "process": {"args": ["a"], "ioPriority": {"class": "IOPRIO_CLASS_RT"}}},
         "process.ioPriority is not supported"),
        ({"process": {"args": ["a\u0000b"]}}, "process.args[0] contains a NUL byte"),
        ({"process": {"args": ["a"], "env": ["NOEQUALS"]}},
         "invalid environment variable 'NOEQUALS': missing"),
        ({"process": {"args": ["a"], "env": ["=x"]}}, "invalid environment variable: name cannot be empty"),
        ({"process": {"args": ["a"], "user": {"uid": -1}}}, "process.user.uid must be an integer from 0 to"),
        ({"process": {"args": ["a"], "user": {"additionalGids": ["1"]}}},
         "process.user.additionalGids[0] must"),
        ({"process": {"args": ["a"], "rlimits": [{"type": "RLIMIT_FOO", "hard": 1, "soft": 1}]}},
         "wrong rlimit value: RLIMIT_FOO"),
        ({"process": {"args": ["a"], "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1, "soft": 2}]}},
         "process.rlimits[0]: the soft limit 2 is above the hard limit 1"),
        ({"process": {"args": ["a"], "rlimits": [None]}}, "process.rlimits[0] must not be null"),
        ({"process": {"args": ["a"], "capabilities": {"bounding": ["CAP_FOO"]}}},
         "unknown capability 'CAP_FOO'"),
        ({"process": {"args": ["a"], "oomScoreAdj": 1001}}, "process.oomScoreAdj must be from -1000 to 1000"),
        ({"mounts": [{"destination": "relative"}]}, "mounts[0]: destination must be an absolute path"),
        ({"linux": {"namespaces": [{"type": "time"}]}}, "namespace time is not supported"),
        ({"linux": {"namespaces": [{"type": "network", "path": "netns"}]}},
         "linux.namespaces[0].path must be an"),
        ({"linux": {"resources": {"memory": {"limit": -2}}}}, "linux.resources.memory.limit must be -1"),
        ({"linux": {"resources": {"pids": {"limit": "1"}}}}, "linux.resources.pids.limit must be an integer"),
        ({"linux": {"resources": {"blockIO": {"weight": 70000}}}}, "linux.resources.blockIO.weight must be"),
        ({"linux": {"resources": {"cpu": {"cpus": "all"}}}}, "linux.resources.cpu.cpus: 'all' is not a list"),
        ({"linux": {"resources": {"devices": [{"allow": "yes"}]}}},
         "linux.resources.devices[0].allow must be"),
        ({"linux": {"sysctl": {"net.x": 1}}}, "linux.sysctl[net.x] must be a string"),
        ({"linux": {"seccomp": []}}, "linux.seccomp must be an object"),
        ({"hooks": {"prestart": [{"path": "hook"}]}}, "hooks.prestart[0]: path must be an absolute path"),
        ({"hooks": {"prestart": [{"path": "/h", "timeout": 0}]}},
         "hooks.prestart[0].timeout must be positive"),
    ],
)
def test_invalid_specs(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    spec = minimal_spec()
    for key, value in change.items():
        if value is None:
            spec.pop(key, None)
        else:
            spec[key] = value
    with pytest.raises(OCIError) as e:
        load_bundle(make_bundle(tmp_path, spec))
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["fifo", "device", "huge", "deep", "latin1"])
def test_a_config_that_cannot_be_read_whole_is_refused_in_one_line(tmp_path: Path, kind: str) -> None:
    """Read without blocking and bounded: a FIFO or /dev/zero would hang or fill memory."""
    config = tmp_path / "config.json"
    if kind == "fifo":
        os.mkfifo(config)
    elif kind == "device":
        config.symlink_to("/dev/zero")
    elif kind == "huge":
        config.write_text(" " * (MAX_JSON_BYTES + 1))
    elif kind == "deep":
        config.write_text("[" * 100_000 + "]" * 100_000)
    else:
        config.write_bytes(b'{"ociVersion": "1.0.2", "hostname": "\xe9"}')
    message = {"fifo": "not a regular file", "device": "not a regular file", "huge": "larger than 16 MiB",
               "deep": "invalid JSON: nested too deeply", "latin1": "invalid JSON: not UTF-8"}[kind]
    with pytest.raises(OCIError, match=f"^config.json: {message}"):
        load_bundle(tmp_path)


def test_process_optional_when_not_required(tmp_path: Path) -> None:
    spec = minimal_spec()
    del spec["process"]
    b = load_bundle(make_bundle(tmp_path, spec), require_process=False)
    assert b.process is None


def test_rootfs_missing(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, minimal_spec(root={"path": "other"}))
    with pytest.raises(OCIError) as e:
        load_bundle(bundle)
    assert str(e.value) == f"rootfs ({bundle / 'other'}) does not exist"


def test_rootfs_not_a_directory(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, minimal_spec(root={"path": "file"}))
    (bundle / "file").write_text("")
    with pytest.raises(OCIError, match=r"rootfs \(.*file\) is not a directory"):
        load_bundle(bundle)


def test_absolute_root_path(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    b = load_bundle(make_bundle(tmp_path, minimal_spec(root={"path": str(elsewhere)})))
    assert b.root_path == elsewhere


def test_no_optional_sections(tmp_path: Path) -> None:
    b = load_bundle(make_bundle(tmp_path, minimal_spec()))
    assert b.mounts == ()
    assert b.namespaces == ()
    assert b.resources == Resources()
    assert b.hostname is None
    assert b.hooks.prestart == ()
    proc = b.process
    assert proc is not None and proc.env == () and proc.user.uid == 0


def test_namespace_paths_and_annotations(tmp_path: Path) -> None:
    spec = minimal_spec(
        linux={"namespaces": [{"type": "network", "path": "/var/run/netns/x"}, {"type": "pid"}]},
        annotations={"io.katacontainers.config.hypervisor.default_vcpus": "2"},
    )
    b = load_bundle(make_bundle(tmp_path, spec))
    assert b.namespaces == (Namespace("network", "/var/run/netns/x"), Namespace("pid"))
    assert b.annotations["io.katacontainers.config.hypervisor.default_vcpus"] == "2"
    with pytest.raises(TypeError):
        b.annotations["x"] = "y"  # type: ignore[index]


def test_mount_bind_detection() -> None:
    assert Mount("/a", "bind", "/x", ()).is_bind
    assert Mount("/a", "none", "/x", ("rbind", "ro")).is_bind
    assert Mount("/a", "", "/x", ("bind",)).is_bind
    assert not Mount("/a", "tmpfs", "tmpfs", ("nosuid",)).is_bind
    assert Mount("/a", "bind", "/x", ("ro",)).read_only


def test_resources_memory_and_cpu() -> None:
    # What `docker run --memory 64m --cpus 0.5 --cpuset-cpus 0` writes.
    spec = {
        "linux": {
            "resources": {
                "memory": {"limit": 67108864, "swap": 134217728},
                "cpu": {"quota": 50000, "period": 100000, "cpus": "0", "shares": 0},
            }
        }
    }
    assert linux_resources(spec) == Resources(67108864, 50000, 100000, "0", None)


def test_resources_unlimited_values() -> None:
    spec = {"linux": {"resources": {"memory": {"limit": -1}, "cpu": {"quota": -1, "period": 0, "cpus": ""}}}}
    assert linux_resources(spec) == Resources()
    assert linux_resources({}) == Resources()


def test_load_process_reference() -> None:
    proc = load_process(REFERENCE / "docker-exec-process.json")
    assert proc["args"] == ["echo", "exec-ok"]
    p = parse_process(proc)
    assert p.args == ("echo", "exec-ok") and p.cwd == "/" and p.user.gid == 0


def test_load_process_errors(tmp_path: Path) -> None:
    path = tmp_path / "process.json"
    with pytest.raises(OCIError, match="process file .* not found"):
        load_process(path)
    path.write_text("{")
    with pytest.raises(OCIError, match="process.json: invalid JSON"):
        load_process(path)
    path.write_text(json.dumps({"args": [], "cwd": "/"}))
    with pytest.raises(OCIError, match=r"^process.args must not be empty$"):
        load_process(path)
    path.write_text(json.dumps({"args": ["sh"], "cwd": "relative"}))
    with pytest.raises(OCIError, match="process.cwd must be an absolute path"):
        load_process(path)


def test_bundle_spec_is_what_was_read(tmp_path: Path) -> None:
    spec = reference("ctr-create-config.json")
    b = load_bundle(make_bundle(tmp_path, spec))
    assert isinstance(b, Bundle)
    assert b.spec["linux"]["cgroupsPath"] == "/test/cap2"
