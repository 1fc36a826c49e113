"""kata.config.load: lookup order, the packaged default, type and value checks, dump."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from kata.config import (
    AgentConfig,
    ConfigError,
    FactoryConfig,
    HypervisorConfig,
    RuntimeSection,
    dump_config,
    find_config,
    load_config,
)
from kata.config.load import PACKAGED_CONFIG
from kata.sandbox import paths


def write(tmp_path: Path, text: str, name: str = "configuration.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


Q = "[hypervisor.qemu]\n"


def test_packaged_default_equals_dataclass_defaults() -> None:
    cfg = load_config(PACKAGED_CONFIG, env={})
    assert cfg.hypervisor == HypervisorConfig()
    assert cfg.agent == AgentConfig()
    assert cfg.runtime == RuntimeSection()
    assert cfg.factory == FactoryConfig()
    assert cfg.source == PACKAGED_CONFIG


def test_packaged_defaults_for_this_project() -> None:
    hv = load_config(PACKAGED_CONFIG, env={}).hypervisor
    assert hv.path == "/usr/bin/qemu-system-x86_64"
    assert hv.kernel == "/usr/share/kata-containers/vmlinux.container"
    assert hv.image == "/usr/share/kata-containers/kata-containers.img"
    assert hv.machine_type == "microvm"
    assert (hv.default_vcpus, hv.default_maxvcpus, hv.default_memory) == (1, 0, 512)
    assert hv.shared_fs == "virtio-fs"
    assert hv.virtio_fs_daemon == "/usr/lib/qemu/virtiofsd"
    assert hv.virtio_fs_cache == "auto"


def test_packaged_file_sets_every_field() -> None:
    # The shipped file documents every key we read; a new field must be added to it too.
    data = tomllib.loads(PACKAGED_CONFIG.read_text())
    dumped = dump_config(load_config(PACKAGED_CONFIG, env={}))
    assert set(data["hypervisor"]["qemu"]) == set(dumped["hypervisor"]["qemu"])
    assert set(data["agent"]["kata"]) == set(dumped["agent"]["kata"])
    assert set(data["runtime"]) == set(dumped["runtime"])


def test_lookup_order(tmp_path: Path) -> None:
    etc = tmp_path / "etc.toml"
    share = write(tmp_path, "[hypervisor.qemu]\ndefault_memory = 300\n", "share.toml")
    assert find_config(env={}, search=(etc, share)) == share
    write(tmp_path, "[hypervisor.qemu]\ndefault_memory = 200\n", "etc.toml")
    assert find_config(env={}, search=(etc, share)) == etc
    assert load_config(env={}, search=(etc, share)).hypervisor.default_memory == 200
    envfile = write(tmp_path, "[hypervisor.qemu]\ndefault_memory = 100\n", "env.toml")
    assert find_config(env={"KATA_CONF_FILE": str(envfile)}, search=(etc, share)) == envfile
    explicit = write(tmp_path, "[hypervisor.qemu]\n", "explicit.toml")
    assert find_config(explicit, env={"KATA_CONF_FILE": str(envfile)}, search=(etc,)) == explicit
    assert find_config(env={"KATA_CONF_FILE": ""}, search=()) == PACKAGED_CONFIG


def test_falls_back_to_packaged(tmp_path: Path) -> None:
    cfg = load_config(env={}, search=(tmp_path / "a.toml", tmp_path / "b.toml"))
    assert cfg.source == PACKAGED_CONFIG


def test_env_var_from_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = write(tmp_path, "[hypervisor.qemu]\ndefault_vcpus = 2\n")
    monkeypatch.setenv("KATA_CONF_FILE", str(f))
    assert load_config().hypervisor.default_vcpus == 2


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml: configuration file not found"):
        load_config(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="env.toml: configuration file not found"):
        load_config(env={"KATA_CONF_FILE": str(tmp_path / "env.toml")})


def test_minimal_file_uses_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[hypervisor.qemu]\n"), env={})
    assert cfg.hypervisor == HypervisorConfig()
    assert cfg.agent == AgentConfig()
    assert cfg.runtime == RuntimeSection()


def test_values_and_unknown_keys(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
[hypervisor.qemu]
machine_type = "q35"
kernel_params = "quiet  panic=-1"
default_vcpus = -1
default_memory = 1024
virtio_fs_extra_args = ["--thread-pool-size=1"]
enable_annotations = ["default_.*", "kernel_params"]
boot_timeout = 5
cpu_features = "pmu=off"          # a Kata key we do not use
valid_hypervisor_paths = ["/usr/bin/qemu-system-*"]
path = "/usr/bin/qemu-system-x86_64"
[agent.kata]
kernel_modules = ["e1000e InterruptThrottleRate=3000"]
agent_channel = "virtio-serial"
debug_console_enabled = true
[runtime]
internetworking_model = "none"
experimental = ["newstore"]
enable_pprof = true
sandbox_cgroup_only = true
[factory]
enable_template = false
""",
        ),
        env={},
    )
    hv = cfg.hypervisor
    assert hv.machine_type == "q35"
    assert hv.kernel_params_list == ("quiet", "panic=-1")
    assert hv.default_vcpus == -1
    assert hv.default_memory == 1024
    assert hv.virtio_fs_extra_args == ("--thread-pool-size=1",)
    assert hv.enable_annotations == ("default_.*", "kernel_params")
    assert hv.boot_timeout == 5.0 and isinstance(hv.boot_timeout, float)
    assert cfg.agent.kernel_modules == ("e1000e InterruptThrottleRate=3000",)
    assert cfg.agent.agent_channel == "virtio-serial"
    assert cfg.runtime.internetworking_model == "none"
    assert cfg.runtime.experimental == ("newstore",)
    assert cfg.runtime.sandbox_cgroup_only is True and RuntimeSection().sandbox_cgroup_only is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[hypervisor.qemu\n", "invalid TOML"),
        ("[runtime]\n", "missing [hypervisor.qemu] section"),
        ("hypervisor = 1\n", "missing [hypervisor.qemu] section"),
        ("[hypervisor.clh]\n", "hypervisor.clh: unsupported hypervisor (supported: qemu)"),
        (Q + "[hypervisor.firecracker]\n", "hypervisor.firecracker: unsupported hypervisor"),
        (Q + "[agent.other]\n", "agent.other: unsupported agent (supported: kata)"),
        ("[hypervisor]\nqemu = 1\n", "hypervisor.qemu: must be a table"),
        (Q + "runtime = 1\n", None),  # unknown key in the hypervisor table: fine
        ("runtime = 1\n[hypervisor.qemu]\n", "runtime: must be a table"),
        (Q + "default_memory = -1\n", "qemu.default_memory: must not be negative, got -1"),
        (Q + "default_memory = 32\n", "qemu.default_memory: 32 MiB is below the minimum"),
        (Q + "default_memory = \"512\"\n", "qemu.default_memory: must be an int, got '512'"),
        (Q + "default_vcpus = 1.5\n", "qemu.default_vcpus: must be an int"),
        (Q + "default_vcpus = true\n", "qemu.default_vcpus: must be an int"),
        (Q + "default_maxvcpus = -2\n", "qemu.default_maxvcpus: must not be negative"),
        (Q + "enable_debug = 1\n", "qemu.enable_debug: must be a bool"),
        (Q + "machine_type = \"virt\"\n", "qemu.machine_type: unsupported value 'virt'"),
        (Q + "shared_fs = \"nfs\"\n", "qemu.shared_fs: unsupported value 'nfs'"),
        (Q + "virtio_fs_cache = \"x\"\n", "qemu.virtio_fs_cache: unsupported value"),
        (Q + "block_device_driver = \"ide\"\n", "qemu.block_device_driver"),
        (Q + "accel = \"hvf\"\n", "qemu.accel: unsupported value 'hvf'"),
        (Q + "boot_timeout = 0\n", "qemu.boot_timeout: must be positive"),
        (Q + "msize_9p = 100\n", "qemu.msize_9p: must be at least 4096"),
        (Q + "kernel = \"vmlinux\"\n", "qemu.kernel: must be an absolute path"),
        (Q + "initrd = \"/x.img\"\n", "qemu.image: image and initrd are mutually"),
        (Q + "virtio_fs_extra_args = \"-o x\"\n", "virtio_fs_extra_args: must be an array of strings"),
        (Q + "enable_annotations = [\"(\"]\n", "enable_annotations: invalid regular expression"),
        (Q + "path = \"/opt/qemu\"\n", "qemu.path: /opt/qemu is not in valid_hypervisor_paths"),
        (
            Q + "virtio_fs_daemon = \"/opt/virtiofsd\"\n",
            "qemu.virtio_fs_daemon: /opt/virtiofsd is not in valid_virtio_fs_daemon_paths",
        ),
        (Q + "[agent.kata]\ndial_timeout = 0\n", "agent.kata.dial_timeout: must be positive"),
        (Q + "[agent.kata]\nagent_channel = \"tcp\"\n", "agent.kata.agent_channel: unsupported"),
        (Q + "[runtime]\ninternetworking_model = \"bridged\"\n", "runtime.internetworking_model"),
        (Q + "[runtime]\nexperimental = [1]\n", "runtime.experimental: must be an array of strings"),
        (Q + "[runtime]\nsandbox_cgroup_only = \"yes\"\n", "runtime.sandbox_cgroup_only: must be a bool"),
    ],
)
def test_invalid_files(tmp_path: Path, text: str, message: str | None) -> None:
    path = write(tmp_path, text)
    if message is None:
        load_config(path, env={})
        return
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    text_of = str(e.value)
    assert text_of.startswith(f"{path}: ")
    assert message in text_of
    assert "\n" not in text_of


def test_path_allowed_by_glob_and_empty_list_means_unrestricted(tmp_path: Path) -> None:
    ok = "[hypervisor.qemu]\npath = \"/opt/qemu/bin/qemu\"\nvalid_hypervisor_paths = [\"/opt/qemu/bin/*\"]\n"
    assert load_config(write(tmp_path, ok), env={}).hypervisor.path == "/opt/qemu/bin/qemu"
    free = "[hypervisor.qemu]\npath = \"/opt/qemu\"\nvalid_hypervisor_paths = []\n"
    assert load_config(write(tmp_path, free, "free.toml"), env={}).hypervisor.path == "/opt/qemu"


def test_virtiofsd_not_checked_without_virtio_fs(tmp_path: Path) -> None:
    text = "[hypervisor.qemu]\nshared_fs = \"virtio-9p\"\nvirtio_fs_daemon = \"\"\n"
    assert load_config(write(tmp_path, text), env={}).hypervisor.shared_fs == "virtio-9p"


def test_initrd_instead_of_image(tmp_path: Path) -> None:
    text = Q + 'image = ""\ninitrd = "/usr/share/kata-containers/kata-containers-initrd.img"\n'
    hv = load_config(write(tmp_path, text), env={}).hypervisor
    assert hv.image == "" and hv.initrd.endswith("initrd.img")


def test_dump_config_layout_and_json() -> None:
    cfg = load_config(PACKAGED_CONFIG, env={})
    dumped = dump_config(cfg)
    assert dumped["meta"] == {"source": str(PACKAGED_CONFIG)}
    qemu = dumped["hypervisor"]["qemu"]
    assert qemu["default_memory"] == 512
    assert qemu["valid_hypervisor_paths"] == ["/usr/bin/qemu-system-x86_64"]
    assert "name" not in qemu
    assert dumped["agent"]["kata"]["agent_channel"] == "auto"
    assert dumped["runtime"]["static_sandbox_resource_mgmt"] is True
    json.dumps(dumped)  # printable as JSON


def test_dump_parses_back(tmp_path: Path) -> None:
    cfg = load_config(PACKAGED_CONFIG, env={})
    dumped = dump_config(cfg)
    del dumped["meta"]
    from kata.config.load import parse_config

    again = parse_config(dumped, tmp_path / "x.toml")
    assert (again.hypervisor, again.agent, again.runtime) == (cfg.hypervisor, cfg.agent, cfg.runtime)


@pytest.mark.parametrize("path", [
    "/run/vc/vm/template",  # Kata's default: a sandbox named "template" would have it
    "/run/vc/vm", "/run/vc/vm/a/b", "/run/vc/sbs/t", "/run/kata-containers/shared/sandboxes/t",
    "/run/vc", "/run", "/", "/run/vc/vm/../vm/template",  # above them, factory destroy takes all
])
def test_templates_are_kept_where_no_sandbox_id_names_them(tmp_path: Path, path: str) -> None:
    if not str(paths.STATE_ROOT).startswith("/run/vc") or not str(paths.SHARED_ROOT).startswith("/run/kata"):
        pytest.skip("KATA_STATE_ROOT or KATA_SHARED_ROOT moved")
    conf = write(tmp_path, Q + f'[factory]\ntemplate_path = "{path}"\n')
    with pytest.raises(ConfigError, match="template_path: .* where sandboxes' ids name the directories"):
        load_config(conf, env={})
    for fine in ("/run/vc/templates", "/var/lib/kata/templates", "/run/vc/vmx"):
        load_config(write(tmp_path, Q + f'[factory]\ntemplate_path = "{fine}"\n'), env={})
