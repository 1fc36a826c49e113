"""kata.cli.spec: `kata-runtime spec` writes runc's example config.json, and its rootless variant."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest

from kata.cli import spec as spec_verb
from kata.errors import KataError
from kata.oci.spec import load_bundle


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kata-runtime")
    spec_verb.add_parser(p.add_subparsers(dest="verb"))
    return p


def written(bundle: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((bundle / "config.json").read_text())
    return data


def test_writes_runcs_example(tmp_path: Path) -> None:
    assert spec_verb.run(argparse.Namespace(bundle=str(tmp_path), rootless=False)) == 0
    raw = (tmp_path / "config.json").read_text()
    assert raw.startswith('{\n\t"ociVersion": ') and not raw.endswith("\n")  # MarshalIndent with a tab
    spec = written(tmp_path)
    assert list(spec) == ["ociVersion", "process", "root", "hostname", "mounts", "linux"]
    assert spec["process"]["args"] == ["sh"] and spec["process"]["terminal"] is True
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    assert spec["process"]["capabilities"] == {k: caps for k in ("bounding", "effective", "permitted")}
    assert spec["process"]["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    assert spec["process"]["noNewPrivileges"] is True
    assert spec["root"] == {"path": "rootfs", "readonly": True}
    assert spec["hostname"] == "runc"
    assert [m["destination"] for m in spec["mounts"]] == [
        "/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup"]
    linux = spec["linux"]
    assert list(linux) == ["resources", "namespaces", "maskedPaths", "readonlyPaths"]
    assert linux["resources"] == {"devices": [{"allow": False, "access": "rwm"}]}
    assert [n["type"] for n in linux["namespaces"]] == ["pid", "network", "ipc", "uts", "mount", "cgroup"]
    assert "/proc/kcore" in linux["maskedPaths"] and "/proc/sys" in linux["readonlyPaths"]


def test_the_example_is_a_valid_bundle(tmp_path: Path) -> None:
    spec_verb.run(argparse.Namespace(bundle=str(tmp_path), rootless=False))
    (tmp_path / "rootfs").mkdir()
    bundle = load_bundle(tmp_path)
    assert bundle.spec["hostname"] == "runc"


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(KataError, match=r"^File config.json exists. Remove it first$"):
        spec_verb.run(argparse.Namespace(bundle=str(tmp_path), rootless=False))
    assert (tmp_path / "config.json").read_text() == "{}"


def test_missing_bundle(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(KataError, match=rf"^chdir {missing}: no such file or directory$"):
        spec_verb.run(argparse.Namespace(bundle=str(missing), rootless=False))


def test_default_bundle_is_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = parser().parse_args(["spec"])
    assert args.bundle == "" and args.rootless is False
    assert args.func(args) == 0
    assert written(tmp_path)["hostname"] == "runc"


def test_parser_flags(tmp_path: Path) -> None:
    args = parser().parse_args(["spec", "-b", str(tmp_path), "--rootless"])
    assert args.bundle == str(tmp_path) and args.rootless is True
    args = parser().parse_args(["spec", "--bundle", str(tmp_path)])
    assert args.func is spec_verb.run
    with pytest.raises(SystemExit):
        parser().parse_args(["spec", "extra"])


def test_rootless(tmp_path: Path) -> None:
    assert spec_verb.run(parser().parse_args(["spec", "--bundle", str(tmp_path), "--rootless"])) == 0
    spec = written(tmp_path)
    linux = spec["linux"]
    assert list(linux) == ["uidMappings", "gidMappings", "namespaces", "maskedPaths", "readonlyPaths"]
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": os.geteuid(), "size": 1}]
    assert linux["gidMappings"] == [{"containerID": 0, "hostID": os.getegid(), "size": 1}]
    assert [n["type"] for n in linux["namespaces"]] == ["pid", "ipc", "uts", "mount", "cgroup", "user"]
    sys_mount = next(m for m in spec["mounts"] if m["destination"] == "/sys")
    assert sys_mount == {"destination": "/sys", "type": "none", "source": "/sys",
                         "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}
    devpts = next(m for m in spec["mounts"] if m["destination"] == "/dev/pts")
    assert devpts["options"] == ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]
    assert "options" not in next(m for m in spec["mounts"] if m["destination"] == "/proc")


def test_to_rootless_drops_uid_gid_only_options() -> None:
    spec = spec_verb.example_spec()
    spec["mounts"].append({"destination": "/x", "type": "tmpfs", "source": "tmpfs",
                           "options": ["uid=1", "gid=2"]})
    spec["linux"]["namespaces"].append({"type": "user"})
    out = spec_verb.to_rootless(spec, 1000, 1000)
    assert out["mounts"][-1] == {"destination": "/x", "type": "tmpfs", "source": "tmpfs"}
    assert [n["type"] for n in out["linux"]["namespaces"]].count("user") == 1


def test_example_is_fresh_each_time() -> None:
    a = spec_verb.example_spec()
    a["process"]["capabilities"]["bounding"].append("CAP_SYS_ADMIN")
    assert "CAP_SYS_ADMIN" not in spec_verb.example_spec()["process"]["capabilities"]["bounding"]
