"""kata.cli.features: `kata-runtime features` prints runc's features document for what the guest can do."""

from __future__ import annotations

import argparse
import json

import pytest

from kata import __version__
from kata.cli import features as features_verb


def test_document_shape() -> None:
    doc = features_verb.features("x86_64")
    assert list(doc) == ["ociVersionMin", "ociVersionMax", "hooks", "mountOptions", "linux", "annotations",
                         "potentiallyUnsafeConfigAnnotations"]
    assert doc["ociVersionMin"] == "1.0.0" and doc["ociVersionMax"] == "1.2.1"  # containerd 2.x writes 1.2.x
    assert doc["hooks"] == ["prestart", "createRuntime", "createContainer", "startContainer", "poststart",
                            "poststop"]
    assert doc["mountOptions"] == sorted(doc["mountOptions"])
    assert {"bind", "rbind", "ro", "rro", "nosuid", "rprivate", "tmpcopyup"} <= set(doc["mountOptions"])
    linux = doc["linux"]
    assert linux["namespaces"] == ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"]
    assert linux["capabilities"][0] == "CAP_CHOWN" and linux["capabilities"][-1] == "CAP_CHECKPOINT_RESTORE"
    assert len(linux["capabilities"]) == 41
    assert linux["cgroup"]["v2"] is True and linux["cgroup"]["v1"] is False
    assert linux["seccomp"]["enabled"] is True
    assert linux["seccomp"]["archs"] == ["SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32"]
    assert "SCMP_ACT_NOTIFY" not in linux["seccomp"]["actions"]
    assert linux["apparmor"] == {"enabled": False} and linux["selinux"] == {"enabled": False}
    assert doc["annotations"]["io.katacontainers.runtime.version"] == __version__
    assert list(doc["annotations"]) == sorted(doc["annotations"])
    assert doc["potentiallyUnsafeConfigAnnotations"] == [
        "io.katacontainers.config.hypervisor.", "io.katacontainers.config.runtime.",
        "io.katacontainers.config.agent."]


def test_run_prints_four_space_json(capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    features_verb.add_parser(p.add_subparsers(dest="verb"))
    args = p.parse_args(["features"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.startswith('{\n    "ociVersionMin": "1.0.0",\n') and out.endswith("}\n")
    assert json.loads(out) == features_verb.features()


def test_unknown_architecture_lists_no_seccomp_archs() -> None:
    assert features_verb.features("riscv64")["linux"]["seccomp"]["archs"] == []
