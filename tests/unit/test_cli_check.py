"""kata.cli.check: the checks judged from fake host facts, their --verbose and --json forms, and the verb
itself run as a process (with --no-probe, so nothing boots)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from kata.cli import check as check_verb
from kata.cli import check_facts
from kata.cli.check_facts import HostFacts, TemplateDir, cgroup_layout, template_dir
from kata.cli.check_rules import Check, evaluate
from kata.config import AgentConfig, FactoryConfig, HypervisorConfig, RuntimeConfig, RuntimeSection
from kata.config.load import PACKAGED_CONFIG
from kata.hypervisor.accel import ProbeResult
from kata.hypervisor.host import HostCapabilities
from kata.utils.mount import fs_type

ROOT = Path(__file__).resolve().parents[2]
HV = HypervisorConfig()
NAMES = ["configuration", "cpu-virtualisation", "kvm-module", "kvm", "qemu", "qemu-seccomp", "guest-kernel",
         "guest-image", "virtiofsd", "vhost-net", "vhost-vsock", "templates", "cgroups"]
GOOD_CAPS = HostCapabilities(
    cpu_vmx=True, cpu_svm=False, dev_kvm=True, kvm_module="intel", dev_vhost_vsock=True, dev_vhost_net=True,
    qemu_path=Path(HV.path), qemu_version="7.2.22", virtiofsd=Path(HV.virtio_fs_daemon))
GOOD = HostFacts(
    caps=GOOD_CAPS, kvm_open_error=None, accel=None, kernel_seccomp=True, qemu_seccomp=True, cgroups="v2",
    templates=TemplateDir("/run/vc/templates", "tmpfs", True),
    present=frozenset({HV.kernel, HV.image, HV.virtio_fs_daemon}))
WITHOUT_KERNEL = frozenset({HV.image, HV.virtio_fs_daemon})
WITHOUT_DAEMON = frozenset({HV.kernel, HV.image})


@dataclasses.dataclass(frozen=True)
class Host:
    """A variation of the good host and the default configuration."""

    caps: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    facts: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    hv: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    agent: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    factory: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def config(self) -> RuntimeConfig:
        return RuntimeConfig(HypervisorConfig(**self.hv), AgentConfig(**self.agent), RuntimeSection(),
                             Path("/etc/kata-containers/configuration.toml"), FactoryConfig(**self.factory))

    def host_facts(self) -> HostFacts:
        return dataclasses.replace(GOOD, caps=dataclasses.replace(GOOD_CAPS, **self.caps), **self.facts)

    def checks(self) -> dict[str, Check]:
        return {c.name: c for c in evaluate(self.host_facts(), self.config())}


SILENT = ProbeResult("tcg", "the guest was silent", cached=False)
RAN = ProbeResult("kvm", "a guest kernel ran", cached=False)


# (check, status, words in what it found, the host): every check but the configuration fails in some way.
CASES: list[tuple[str, str, str, Host]] = [
    ("cpu-virtualisation", "ok", "svm", Host(caps={"cpu_vmx": False, "cpu_svm": True, "kvm_module": "amd"})),
    ("cpu-virtualisation", "warning", "no vmx or svm: VMs run under TCG", Host(caps={"cpu_vmx": False})),
    ("kvm-module", "warning", "kvm_pvm", Host(caps={"kvm_module": "pvm"})),
    ("kvm-module", "warning", "none", Host(caps={"kvm_module": "none"})),
    ("kvm", "warning", "absent: VMs run under TCG", Host(caps={"dev_kvm": False})),
    ("kvm", "warning", "cannot be opened (Permission denied)",
     Host(facts={"kvm_open_error": "Permission denied"})),
    ("kvm", "warning", "opens, but the host lacks vmx/svm", Host(caps={"kvm_module": "pvm"})),
    ("kvm", "warning", "opens, but the guest was silent", Host(facts={"accel": SILENT})),
    ("kvm", "ok", "usable: a guest ran under it", Host(caps={"cpu_vmx": False}, facts={"accel": RAN})),
    ("kvm", "problem", 'accel = "kvm", but /dev/kvm absent',
     Host(caps={"dev_kvm": False}, hv={"accel": "kvm"})),
    ("kvm", "problem", 'accel = "kvm", but /dev/kvm opens, but the host lacks',
     Host(caps={"kvm_module": "pvm"}, facts={"accel": ProbeResult("kvm", "set in the configuration", False)},
          hv={"accel": "kvm"})),
    ("kvm", "ok", 'not used: accel = "tcg"', Host(caps={"dev_kvm": False}, hv={"accel": "tcg"})),
    ("qemu", "problem", f"QEMU {HV.path} is missing or does not run", Host(caps={"qemu_version": None})),
    ("qemu-seccomp", "warning", 'off: seccompsandbox = ""', Host(hv={"seccompsandbox": ""})),
    ("qemu-seccomp", "problem", "no seccomp filters", Host(facts={"kernel_seccomp": False})),
    ("qemu-seccomp", "problem", "this QEMU has no -sandbox", Host(facts={"qemu_seccomp": False})),
    ("qemu-seccomp", "warning", "not checked", Host(facts={"qemu_seccomp": None})),
    ("guest-kernel", "problem", f"guest kernel {HV.kernel} is missing",
     Host(facts={"present": WITHOUT_KERNEL})),
    ("guest-image", "problem", f"guest image {HV.image} is missing",
     Host(facts={"present": frozenset({HV.kernel, HV.virtio_fs_daemon})})),
    ("guest-image", "ok", "present",
     Host(hv={"image": "", "initrd": "/i.img"}, facts={"present": frozenset({HV.kernel, "/i.img"})})),
    ("virtiofsd", "problem", f"virtiofsd {HV.virtio_fs_daemon} is missing",
     Host(facts={"present": WITHOUT_DAEMON})),
    ("virtiofsd", "ok", "not needed: shared_fs = 'virtio-9p'",
     Host(hv={"shared_fs": "virtio-9p"}, facts={"present": WITHOUT_DAEMON})),
    ("vhost-net", "warning", "absent", Host(caps={"dev_vhost_net": False})),
    ("vhost-vsock", "ok", "not needed: the agent channel is virtio-serial",
     Host(caps={"dev_vhost_vsock": False})),
    ("vhost-vsock", "ok", "the agent channel is vsock", Host(agent={"agent_channel": "vsock"})),
    ("vhost-vsock", "problem", "needs /dev/vhost-vsock",
     Host(caps={"dev_vhost_vsock": False}, agent={"agent_channel": "vsock"})),
    ("templates", "warning", "on ext4, not tmpfs",
     Host(facts={"templates": TemplateDir("/run/vc/templates", "ext4", True)})),
    ("templates", "problem", "template directory /t is not writable",
     Host(facts={"templates": TemplateDir("/t", "tmpfs", False)})),
    ("templates", "ok", "not used: enable_template = false",
     Host(facts={"templates": TemplateDir("/t", "ext4", False)}, factory={"enable_template": False})),
    ("templates", "ok", "vsock VMs boot cold",
     Host(facts={"templates": TemplateDir("/t", "ext4", False)}, agent={"agent_channel": "vsock"})),
    ("cgroups", "ok", "hybrid", Host(facts={"cgroups": "hybrid"})),
    ("cgroups", "ok", "v1", Host(facts={"cgroups": "v1"})),
    ("cgroups", "warning", "no cgroup filesystem", Host(facts={"cgroups": "none"})),
]


def test_a_good_host_passes_every_check() -> None:
    checks = evaluate(GOOD, Host().config())
    assert [c.name for c in checks] == NAMES
    assert [c.status for c in checks] == ["ok"] * len(NAMES)
    assert all(c.looked_at and c.why and c.found and not c.todo for c in checks)


@pytest.mark.parametrize(("name", "status", "found", "host"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_each_check_judges_its_fact(name: str, status: str, found: str, host: Host) -> None:
    checks = host.checks()
    assert (checks[name].status, found in checks[name].found) == (status, True), checks[name]
    for c in checks.values():  # a remedy exactly where something is wrong
        assert bool(c.todo) == (c.status != "ok"), c


def test_every_check_but_the_configuration_can_fail() -> None:
    failing = {name for name, status, _, _ in CASES if status != "ok"}
    assert failing == set(NAMES) - {"configuration"}


def test_problem_lines_keep_the_old_wording() -> None:
    checks = Host(facts={"present": WITHOUT_KERNEL}).checks()
    old = f"guest kernel {HV.kernel} is missing: run `kata-osbuilder build`"
    assert checks["guest-kernel"].problem_line == old
    virtiofsd = Host(facts={"present": WITHOUT_DAEMON}, caps={"virtiofsd": None}).checks()
    assert virtiofsd["virtiofsd"].todo == 'install qemu-system-common, or set shared_fs = "virtio-9p"'
    elsewhere = Host(facts={"present": WITHOUT_DAEMON}, caps={"virtiofsd": Path("/v")}).checks()
    assert elsewhere["virtiofsd"].todo.startswith("set virtio_fs_daemon = '/v'")


def _table(facts: HostFacts, cfg: RuntimeConfig) -> dict[str, Any]:
    return check_verb.host_facts(facts, cfg)


def test_verbose_prints_a_block_per_check() -> None:
    host = Host(caps={"dev_vhost_net": False}, facts={"present": WITHOUT_KERNEL})
    facts, cfg = host.host_facts(), host.config()
    checks = evaluate(facts, cfg)
    lines = check_verb.render_verbose(_table(facts, cfg), checks)
    headers = [i for i, line in enumerate(lines) if not line.startswith(" ")][:-2]
    assert [lines[i].split()[:2] for i in headers] == [[c.status, f"{c.name}:"] for c in checks]
    for start, end, c in zip(headers, [*headers[1:], len(lines) - 2], checks, strict=True):
        labels = [line.split(":")[0].strip() for line in lines[start + 1:end] if line.startswith("    ")
                  and not line.startswith("        ")]
        assert labels == (["looked at", "why"] if c.status == "ok" else ["looked at", "why", "to do"]), c.name
    assert all(len(line) <= check_verb.WIDTH for line in lines)
    assert lines[-2] == f"{len(NAMES) - 2} ok, 1 warning(s), 1 problem(s)"
    assert lines[-1] == "Sandboxes cannot start here: see each problem"
    good = check_verb.render_verbose(_table(GOOD, cfg), evaluate(GOOD, cfg))
    assert good[-1].startswith("System is capable")


def test_plain_output_is_the_table_then_errors_or_the_verdict() -> None:
    cfg = Host().config()
    accel = ProbeResult("tcg", "no /dev/kvm", cached=True)
    table = _table(dataclasses.replace(GOOD, accel=accel), cfg)
    assert list(table) == ["config", "cpu_hardware_virtualisation", "dev_kvm", "kvm_module", "qemu",
                           "virtiofsd", "vhost_vsock", "vhost_net", "guest_kernel", "guest_image",
                           "accelerator", "accelerator_reason", "agent_channel"]
    lines = check_verb.render_plain(table, evaluate(GOOD, cfg))
    assert lines[0] == f"{'config':30s} /etc/kata-containers/configuration.toml"
    assert lines[11] == f"{'accelerator_reason':30s} no /dev/kvm (cached)"
    assert lines[-1] == "System is capable of running Kata Containers (accelerator: tcg)"
    broken = Host(facts={"present": WITHOUT_KERNEL})
    lines = check_verb.render_plain(_table(broken.host_facts(), cfg), evaluate(broken.host_facts(), cfg))
    assert lines[-1] == f"ERROR: guest kernel {HV.kernel} is missing: run `kata-osbuilder build`"
    assert not any(line.startswith("System is capable") for line in lines)


def test_json_has_the_table_the_problems_and_every_check() -> None:
    host = Host(caps={"dev_vhost_vsock": False}, agent={"agent_channel": "vsock"})
    facts, cfg = host.host_facts(), host.config()
    doc = json.loads(json.dumps(check_verb.report(_table(facts, cfg), evaluate(facts, cfg))))
    assert "agent_channel" not in doc and doc["vhost_vsock"] is False
    assert doc["problems"] == ["agent channel vsock needs /dev/vhost-vsock, which this host lacks: modprobe "
                               'vhost_vsock, or set agent_channel = "virtio-serial"']
    assert [c["name"] for c in doc["checks"]] == NAMES
    assert all(set(c) == {"name", "status", "found", "looked_at", "why", "todo"} for c in doc["checks"])
    assert {c["name"]: c["status"] for c in doc["checks"]}["vhost-vsock"] == "problem"


@pytest.mark.parametrize(("host", "verbose", "status"), [
    (Host(caps={"dev_vhost_net": False, "kvm_module": "pvm"}), True, 0),  # warnings alone: containers run
    (Host(caps={"qemu_version": None}), False, 1),
    (Host(facts={"templates": TemplateDir("/t", "tmpfs", False)}), True, 1),
])
def test_exit_status_is_one_only_for_a_problem(host: Host, verbose: bool, status: int,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(check_facts, "gather", lambda cfg, probe: host.host_facts())
    args = argparse.Namespace(config=str(PACKAGED_CONFIG), json=False, no_probe=True, verbose=verbose)
    assert check_verb.run(args) == status
    out = capsys.readouterr().out
    assert ("    why: " in out) == verbose


MOUNTINFO = (
    b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    b"30 22 0:26 / /sys/fs/cgroup ro,nosuid shared:4 - tmpfs tmpfs ro,mode=755\n"
    b"31 30 0:27 / /sys/fs/cgroup/unified rw shared:5 - cgroup2 cgroup2 rw\n"
    b"32 30 0:28 / /sys/fs/cgroup/memory rw shared:6 master:2 - cgroup cgroup rw,memory\n"
    b"40 22 0:30 / /run/vc/templates rw - ext4 /dev/sdb rw\n"
    b"41 22 0:31 / /run/vc/templates rw - tmpfs tmpfs rw\n"
    b"50 22 0:32 / /mnt/a\\040b rw - xfs /dev/sdc rw\n"
)


def test_fs_type_is_the_deepest_mount_above_a_path() -> None:
    assert fs_type("/run/vc/templates/not/made/yet", MOUNTINFO) == "tmpfs"  # the later of two stacked mounts
    assert fs_type("/run/vc", MOUNTINFO) == "ext4"
    assert fs_type("/mnt/a b/x", MOUNTINFO) == "xfs"
    assert fs_type("/sys/fs/cgroupfoo", MOUNTINFO) == "ext4"
    assert fs_type("/x", b"") is None


def test_cgroup_layout_from_mountinfo() -> None:
    assert cgroup_layout(MOUNTINFO) == "hybrid"
    assert cgroup_layout(MOUNTINFO.replace(b" - cgroup2 cgroup2", b" - tmpfs tmpfs")) == "v1"
    assert cgroup_layout(b"30 22 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n") == "v2"
    assert cgroup_layout(b"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n") == "none"


def test_template_dir_judges_the_nearest_existing_parent(tmp_path: Path) -> None:
    mountinfo = f"40 22 0:30 / {tmp_path} rw - tmpfs tmpfs rw\n".encode()
    assert template_dir(str(tmp_path / "a" / "b"), mountinfo) == TemplateDir(str(tmp_path / "a" / "b"),
                                                                             "tmpfs", True)
    if os.geteuid() != 0:  # root may write anywhere but a read-only mount
        tmp_path.chmod(0o500)
        assert not template_dir(str(tmp_path / "a"), mountinfo).writable


def test_the_verb_prints_a_block_per_check_without_booting() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KATA_CONF_FILE": str(PACKAGED_CONFIG)}
    proc = subprocess.run([sys.executable, "-m", "kata.cli.main", "check", "--no-probe", "--verbose"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert "Traceback" not in proc.stdout + proc.stderr and not proc.stderr, proc.stderr
    headers = re.findall(r"^(ok|warning|problem) +([a-z-]+): ", proc.stdout, re.MULTILINE)
    assert [name for _, name in headers] == NAMES
    assert proc.stdout.count("\n    looked at: ") == len(NAMES)
    assert proc.returncode == (1 if any(status == "problem" for status, _ in headers) else 0)
