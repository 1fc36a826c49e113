"""Core pieces that need no VM: ids, state files, VM description, shared-dir bind mounts, CLI errors."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path

import pytest

from kata.config import HypervisorConfig, load_config
from kata.config.load import PACKAGED_CONFIG
from kata.errors import KataError
from kata.hypervisor.base import VMConfig
from kata.hypervisor.qemu_argv import RunPaths, kernel_cmdline
from kata.sandbox import vm
from kata.sandbox.paths import (
    VM_ROOT,
    VM_SOCKETS,
    InvalidIdError,
    SandboxPaths,
    max_sandbox_id_length,
    validate_id,
    validate_sandbox_id,
)
from kata.specconv import VMSizing
from kata.utils.files import locked, read_json, write_json
from kata.utils.ids import MAX_ID_LENGTH, shown
from kata.utils.text import one_line
from tests.conftest import runtime_bin


# What the real clients pass: Docker's and podman's 64 hex digits, containerd's identifiers (up to 76
# characters), runc users' names; runc also takes a leading dash or dot, and "+".
@pytest.mark.parametrize("good", ["abc", "a.b-c_d+1", "x" * 64, "f" * 76, "-x", ".hidden", "...", "A_Z"])
def test_valid_ids(good: str) -> None:
    assert validate_id(good) == good
    assert validate_sandbox_id(good) == good


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "a b", "../x", "x\n", "a,b", "caf\u00e9", "\u0661",
                                 "x" * (MAX_ID_LENGTH + 1), "a\x00b", "a:b", "a*", "~"])
def test_invalid_ids(bad: str) -> None:
    with pytest.raises(InvalidIdError) as exc:
        validate_id(bad)
    assert len(str(exc.value).splitlines()) == 1 and str(exc.value).isprintable()
    assert str(exc.value).startswith("container id cannot be empty" if not bad else "invalid id format: ")


def test_a_sandbox_id_must_leave_room_for_its_sockets() -> None:
    limit = max_sandbox_id_length()
    # Under the default /run/vc: containerd's longest ids fit.
    assert limit == 107 - len(f"{VM_ROOT}//agent-proxy.sock")
    assert str(VM_ROOT) != "/run/vc/vm" or limit == 79
    assert validate_sandbox_id("s" * limit)
    with pytest.raises(InvalidIdError, match=f"longer than {limit} characters"):
        SandboxPaths("s" * (limit + 1))
    with pytest.raises(InvalidIdError):
        SandboxPaths("../x")
    longest = SandboxPaths("s" * limit).vm_dir / max(VM_SOCKETS, key=len)
    assert len(os.fsencode(longest)) == 107


def test_a_state_root_too_long_for_any_socket_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from kata.sandbox import paths

    monkeypatch.setattr(paths, "VM_ROOT", Path("/" + "r" * 100) / "vm")
    with pytest.raises(KataError, match="KATA_STATE_ROOT .* is too long"):
        validate_sandbox_id("c1")


def test_every_vm_socket_is_counted() -> None:
    """The sockets a VM directory gets are all in VM_SOCKETS, which bounds sandbox ids."""
    paths = SandboxPaths("sb1")
    run = RunPaths(paths.vm_dir)
    for sock in (run.qmp_socket, run.agent_socket, paths.virtiofsd_socket, paths.agent_proxy_socket):
        assert sock.parent == paths.vm_dir and sock.name in VM_SOCKETS


def test_shown_and_one_line_keep_messages_on_one_line() -> None:
    assert shown("abc") == "abc"
    assert shown("a\nb\u2028c\x85d\u00e9") == "a\\x0ab\\u2028c\\x85d\\xe9"
    assert shown("x" * 200) == "x" * 80 + "..."
    assert one_line("first\nsecond") == "first" and one_line("a\u2028b") == "a" and one_line("") == ""
    assert one_line("a\tb\x1bc\u200fd") == "a\\tb\\x1bc\\u200fd"  # a tab, an escape, a direction mark


def test_store_is_atomic_and_readable(tmp_path: Path) -> None:
    f = tmp_path / "state.json"
    write_json(f, {"state": "ready", "n": 1})
    assert read_json(f) == {"state": "ready", "n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left
    lock = tmp_path / "lock"
    with locked(lock):
        # Another open file description (as another process would have) cannot take it meanwhile.
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on leaving the block
    finally:
        os.close(fd)


def test_agent_channel_choice() -> None:
    assert vm.agent_channel("auto", vsock_available=False) == "virtio-serial"
    assert vm.agent_channel("auto", vsock_available=True) == "virtio-serial"  # vsock is an opt-in
    assert vm.agent_channel("vsock", vsock_available=True) == "vsock"
    assert vm.agent_channel("virtio-serial", vsock_available=True) == "virtio-serial"
    with pytest.raises(ValueError, match="vhost-vsock"):
        vm.agent_channel("vsock", vsock_available=False)


def test_vm_config_carries_sizing_shares_and_params() -> None:
    hv = HypervisorConfig(kernel_params="quiet foo=bar")
    paths = SandboxPaths("sb1")
    cfg = vm.build_vm_config("sb1", hv, VMSizing(2, 2, 640), paths, "tcg", "virtio-serial",
                             ("console=ttyS0",), debug=True)
    assert cfg.vcpus == 2 and cfg.memory_mib == 640 and cfg.accel == "tcg"
    assert cfg.kernel_params[0] == "console=ttyS0"
    assert "init=/usr/bin/kata-agent" in cfg.kernel_params
    assert "agent.log=debug" in cfg.kernel_params
    # user parameters come last so they win over ours (e.g. a later init=)
    assert cfg.kernel_params[-2:] == ("quiet", "foo=bar")
    assert cfg.shared_fs is not None and cfg.shared_fs.kind == "virtio-fs"
    assert cfg.shared_fs.vhost_user_socket == paths.virtiofsd_socket
    nine_p = vm.build_vm_config("sb1", HypervisorConfig(shared_fs="virtio-9p"), VMSizing(1, 1, 512), paths,
                                "kvm", "vsock", (), debug=False)
    assert nine_p.shared_fs is not None and nine_p.shared_fs.kind == "virtio-9p"
    # The driver names the channel on the command line it builds from this description.
    assert "agent.channel=vsock" in kernel_cmdline(nine_p, vsock=True).split()
    assert vm.build_vm_config("sb1", HypervisorConfig(shared_fs="none"), VMSizing(1, 1, 512), paths,
                              "kvm", "vsock", (), debug=False).shared_fs is None


def test_vm_config_maps_the_image_as_persistent_memory_unless_told_not_to(tmp_path: Path) -> None:
    image = tmp_path / "root.img"
    image.write_bytes(b"\0" * 4096)
    os.truncate(image, 4 << 20)
    paths = SandboxPaths("sb1")

    def build(**hv: object) -> VMConfig:
        return vm.build_vm_config("sb1", HypervisorConfig(image=str(image), **hv),  # type: ignore[arg-type]
                                  VMSizing(1, 1, 512), paths, "tcg", "virtio-serial", (), debug=False)

    assert build().image_pmem_size == 4 << 20
    assert build(disable_image_nvdimm=True).image_pmem_size == 0
    image.unlink()  # the start reports a missing image; the config only leaves it on a disk
    assert build().image_pmem_size == 0
    # Only a regular file is ever mapped (an annotation could name a device's or sysfs's).
    image.mkdir()
    assert build().image_pmem_size == 0
    image.rmdir()
    os.mkfifo(image)
    assert build().image_pmem_size == 0


@pytest.mark.parametrize(("shared_fs", "from_template", "reports"), [
    ("virtio-fs", True, True),  # a clone's RAM is its own memfd
    ("virtio-fs", False, True),
    ("virtio-9p", False, True),  # booted: its own RAM
    ("virtio-9p", True, False),  # clones map the template's file copy-on-write
    ("none", True, False),
])
def test_vm_config_reports_freed_memory_unless_clones_map_the_template(
        shared_fs: str, from_template: bool, reports: bool) -> None:
    def build(**hv: object) -> VMConfig:
        return vm.build_vm_config("sb1", HypervisorConfig(shared_fs=shared_fs, **hv),  # type: ignore[arg-type]
                                  VMSizing(1, 1, 512), SandboxPaths("sb1"), "tcg", "virtio-serial", (),
                                  debug=False, from_template=from_template)

    assert build().free_page_reporting is reports
    assert build(reclaim_guest_freed_memory=False).free_page_reporting is False


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """kata-runtime with this tree's packaged configuration, not the one the host has installed (which
    is as old as the last scripts/install.sh)."""
    env = {**os.environ, "KATA_CONF_FILE": str(PACKAGED_CONFIG)}
    return subprocess.run([runtime_bin(), *args], capture_output=True, text=True, timeout=60, env=env)


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    for args, words in (
        (("run", "--bundle", str(tmp_path / "none"), "c1"), "none"),
        (("run", "--bundle", str(tmp_path), "bad/id"), "invalid id"),
        (("--config", str(tmp_path / "missing.toml"), "env"), "missing.toml"),
    ):
        proc = _cli(*args)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert words in proc.stderr


def test_cli_env_prints_the_configuration() -> None:
    proc = _cli("env", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["hypervisor"]["qemu"]["machine_type"] == load_config(PACKAGED_CONFIG).hypervisor.machine_type
    assert "[hypervisor.qemu]" in _cli("env").stdout


def test_cli_log_json_records_the_error(tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    proc = _cli("--log", str(log), "--log-format", "json", "run", "--bundle", str(tmp_path / "x"), "c1")
    assert proc.returncode != 0
    line = json.loads(log.read_text().splitlines()[-1])
    assert line["level"] == "error" and "x" in line["msg"] and line["time"]


def test_cli_check_reports_host_facts() -> None:
    proc = _cli("check", "--json", "--no-probe")
    facts = json.loads(proc.stdout)
    assert set(facts) >= {"dev_kvm", "kvm_module", "qemu", "virtiofsd", "vhost_vsock", "agent_channel",
                          "problems"}
    assert facts["agent_channel"] == ("vsock" if facts["vhost_vsock"] else "virtio-serial")
    assert proc.returncode == (1 if facts["problems"] else 0)


def test_cli_version() -> None:
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("kata-runtime")
    assert "OCI specs" in _cli("version").stdout


def test_guest_memory_block_size_is_checked() -> None:
    from kata.sandbox.sandbox import memory_block_mib

    assert memory_block_mib(128 << 20) == 128
    assert memory_block_mib(2 << 30) == 2048
    # A hostile guest's numbers never size the host's hotplug.
    for bad in (0, 1, (128 << 20) + 1, 96 << 20, 1 << 62, 2**64 - 1):
        assert memory_block_mib(bad) is None
