"""kata.config.annotations: Kata's enable_annotations gate, path allow-lists, value parsing."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from kata.config import ConfigError, HypervisorConfig, RuntimeConfig, apply_annotations
from kata.config.model import AgentConfig, RuntimeSection

H = "io.katacontainers.config.hypervisor."
R = "io.katacontainers.config.runtime."
A = "io.katacontainers.config.agent."


def config(**hv: Any) -> RuntimeConfig:
    return RuntimeConfig(
        hypervisor=dataclasses.replace(HypervisorConfig(), **hv),
        agent=AgentConfig(),
        runtime=RuntimeSection(),
        source=Path("/etc/kata-containers/configuration.toml"),
    )


def test_no_annotations_is_identity() -> None:
    cfg = config()
    assert apply_annotations(cfg, {}) == cfg


def test_foreign_annotations_ignored() -> None:
    cfg = config()
    out = apply_annotations(
        cfg,
        {
            "io.kubernetes.cri.sandbox-id": "abc",
            "io.katacontainers.pkg.oci.container_type": "pod_sandbox",
            "org.opencontainers.image.ref.name": "x",
        },
    )
    assert out == cfg


def test_hypervisor_annotation_not_enabled() -> None:
    with pytest.raises(ConfigError) as e:
        apply_annotations(config(), {H + "default_vcpus": "2"})
    assert str(e.value) == f"annotation {H}default_vcpus is not enabled"


def test_enabled_by_regex_unanchored() -> None:
    # Go's MatchString finds the pattern anywhere in the short name.
    cfg = config(enable_annotations=("default_",))
    out = apply_annotations(
        cfg, {H + "default_vcpus": "2", H + "default_memory": "1024", H + "default_max_vcpus": "4"}
    ).hypervisor
    assert (out.default_vcpus, out.default_memory, out.default_maxvcpus) == (2, 1024, 4)
    assert cfg.hypervisor.default_vcpus == 1  # input unchanged
    with pytest.raises(ConfigError, match="kernel_params is not enabled"):
        apply_annotations(cfg, {H + "kernel_params": "quiet"})


def test_unknown_but_enabled_hypervisor_annotation_ignored() -> None:
    cfg = config(enable_annotations=(".*",))
    assert apply_annotations(cfg, {H + "enable_iommu": "true"}) == cfg


def test_kernel_params_appended() -> None:
    cfg = config(enable_annotations=("kernel_params",), kernel_params="quiet")
    out = apply_annotations(cfg, {H + "kernel_params": "agent.log=debug"})
    assert out.hypervisor.kernel_params == "quiet agent.log=debug"
    empty = apply_annotations(config(enable_annotations=("kernel_params",)), {H + "kernel_params": "a=1"})
    assert empty.hypervisor.kernel_params == "a=1"


@pytest.mark.parametrize(
    ("short", "value", "message"),
    [
        ("default_vcpus", "two", "invalid unsigned integer 'two'"),
        ("default_vcpus", "-1", "invalid unsigned integer '-1'"),
        ("default_memory", "16", "16 MiB is below the minimum"),
        ("machine_type", "virt", "unsupported value 'virt'"),
        ("shared_fs", "nfs", "unsupported value 'nfs'"),
        ("msize_9p", "12", "must be at least 4096"),
        ("virtio_fs_extra_args", "-o x", "must be a JSON array of strings"),
        ("virtio_fs_extra_args", "[1]", "must be a JSON array of strings"),
        ("enable_debug", "yes", "invalid boolean 'yes'"),
        ("kernel", "vmlinux", "must be an absolute path, got 'vmlinux'"),
    ],
)
def test_invalid_values(short: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        apply_annotations(config(enable_annotations=(".*",)), {H + short: value})
    assert str(e.value).startswith(f"annotation {H}")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_max_vcpus_error_names_the_annotation() -> None:
    # The TOML key is default_maxvcpus; the annotation (Kata's name) is default_max_vcpus.
    cfg = config(enable_annotations=(".*",))
    out = apply_annotations(cfg, {H + "default_max_vcpus": "0"})
    assert out.hypervisor.default_maxvcpus == 0


def test_hypervisor_path_needs_allow_list() -> None:
    cfg = config(enable_annotations=("path",), valid_hypervisor_paths=("/usr/bin/qemu-system-*",))
    out = apply_annotations(cfg, {H + "path": "/usr/bin/qemu-system-i386"})
    assert out.hypervisor.path == "/usr/bin/qemu-system-i386"
    with pytest.raises(ConfigError) as e:
        apply_annotations(cfg, {H + "path": "/tmp/evil"})
    assert str(e.value) == f"annotation {H}path: /tmp/evil is not in valid_hypervisor_paths"
    nothing_allowed = config(enable_annotations=("path",), valid_hypervisor_paths=())
    with pytest.raises(ConfigError, match="is not in valid_hypervisor_paths"):
        apply_annotations(nothing_allowed, {H + "path": "/usr/bin/qemu-system-x86_64"})


def test_virtiofsd_path_needs_allow_list() -> None:
    cfg = config(enable_annotations=("virtio_fs",))
    with pytest.raises(ConfigError, match="/opt/vfsd is not in valid_virtio_fs_daemon_paths"):
        apply_annotations(cfg, {H + "virtio_fs_daemon": "/opt/vfsd"})
    out = apply_annotations(
        cfg, {H + "virtio_fs_extra_args": '["--thread-pool-size=1"]', H + "virtio_fs_cache": "never"}
    )
    assert out.hypervisor.virtio_fs_extra_args == ("--thread-pool-size=1",)
    assert out.hypervisor.virtio_fs_cache == "never"


def _assets(tmp_path: Path, *names: str) -> Path:
    home = tmp_path / "assets"
    home.mkdir(exist_ok=True)
    for name in names:
        (home / name).write_bytes(b"x")
    return home


def test_kernel_and_initrd_annotations(tmp_path: Path) -> None:
    k = _assets(tmp_path, "vmlinux", "default-vmlinux", "initrd.img", "a.img", "b.img")
    cfg = config(enable_annotations=("kernel$", "initrd", "image"), kernel=f"{k}/default-vmlinux")
    out = apply_annotations(cfg, {H + "kernel": f"{k}/vmlinux", H + "initrd": f"{k}/initrd.img"})
    assert out.hypervisor.kernel == f"{k}/vmlinux"
    # An initrd per pod replaces the configured image (they are mutually exclusive).
    assert (out.hypervisor.initrd, out.hypervisor.image) == (f"{k}/initrd.img", "")
    with pytest.raises(ConfigError, match="mutually exclusive"):
        apply_annotations(cfg, {H + "image": f"{k}/a.img", H + "initrd": f"{k}/b.img"})


@pytest.mark.parametrize("named", [
    "/etc/shadow",  # a host file the guest could then read as its disk
    "/dev/mem",  # a device
    "{k}/missing.img",
    "{k}/sub",  # a directory
    "{k}/out.img",  # a symlink out of the assets' directory
    "{k}/../elsewhere.img",  # a regular file beside it, reached with ..
    "{k}/fifo",
])
def test_a_pod_names_only_guest_assets(tmp_path: Path, named: str) -> None:
    """QEMU maps or reads the file into the guest: a kernel, image, initrd or firmware a pod names
    must be a regular file in the configured assets' directory."""
    k = _assets(tmp_path, "kernel")
    (k / "sub").mkdir()
    (tmp_path / "elsewhere.img").write_bytes(b"x")
    (k / "out.img").symlink_to(tmp_path / "elsewhere.img")
    os.mkfifo(k / "fifo")
    cfg = config(enable_annotations=("image", "kernel", "initrd", "firmware"), kernel=f"{k}/kernel")
    for key in ("image", "kernel", "initrd", "firmware"):
        with pytest.raises(ConfigError, match=f"annotation {H}{key}: .* is not a guest asset"):
            apply_annotations(cfg, {H + key: named.format(k=k)})


def test_a_symlink_among_the_assets_is_resolved(tmp_path: Path) -> None:
    k = _assets(tmp_path, "kernel", "image-1234.img", "other.img")
    (k / "image.img").symlink_to("image-1234.img")
    (k / "alias.img").symlink_to("other.img")
    cfg = config(enable_annotations=("image",), kernel=f"{k}/kernel", image=f"{k}/image.img")
    # Another file: resolved, so that QEMU opens what was checked.
    assert apply_annotations(cfg, {H + "image": f"{k}/alias.img"}).hypervisor.image == f"{k}/other.img"
    # The configured image, by either name: as configured (the shape, template and pool of every pod).
    for named in ("image.img", "image-1234.img"):
        assert apply_annotations(cfg, {H + "image": f"{k}/{named}"}).hypervisor.image == f"{k}/image.img"


def test_assets_linked_from_elsewhere_are_assets_where_they_lie(tmp_path: Path) -> None:
    """A configured asset that is a symlink into another directory (as distributions link a kernel
    from /boot): the files beside its target are assets too, not those below them."""
    store = _assets(tmp_path, "vmlinuz-6.1", "vmlinuz-6.2")
    (store / "grub").mkdir()
    (store / "grub" / "grub.cfg").write_bytes(b"x")
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "vmlinuz.container").symlink_to(store / "vmlinuz-6.1")
    cfg = config(enable_annotations=("kernel",), kernel=f"{conf}/vmlinuz.container")
    out = apply_annotations(cfg, {H + "kernel": f"{conf}/vmlinuz.container"})
    assert out.hypervisor.kernel == f"{conf}/vmlinuz.container"
    other = apply_annotations(cfg, {H + "kernel": f"{store}/vmlinuz-6.2"})
    assert other.hypervisor.kernel == f"{store}/vmlinuz-6.2"
    with pytest.raises(ConfigError, match="is not a guest asset"):
        apply_annotations(cfg, {H + "kernel": f"{store}/grub/grub.cfg"})


def test_runtime_and_agent_annotations_not_gated() -> None:
    cfg = config()  # enable_annotations empty
    out = apply_annotations(
        cfg,
        {
            R + "disable_new_netns": "true",
            R + "sandbox_cgroup_only": "1",
            R + "internetworking_model": "none",
            A + "kernel_modules": "e1000e InterruptThrottleRate=3000;i915 enable_ppgtt=0; ",
            R + "enable_pprof": "true",  # Kata key we do not implement
        },
    )
    assert out.runtime.disable_new_netns is True
    assert out.runtime.sandbox_cgroup_only is True
    assert out.runtime.internetworking_model == "none"
    assert out.agent.kernel_modules == ("e1000e InterruptThrottleRate=3000", "i915 enable_ppgtt=0")


def test_runtime_annotation_invalid() -> None:
    with pytest.raises(ConfigError, match=f"annotation {R}disable_new_netns: invalid boolean"):
        apply_annotations(config(), {R + "disable_new_netns": "maybe"})
    with pytest.raises(ConfigError, match=f"annotation {R}internetworking_model: unsupported value"):
        apply_annotations(config(), {R + "internetworking_model": "bridged"})


def test_first_error_is_deterministic() -> None:
    cfg = config(enable_annotations=("default_vcpus",))
    annotations = {H + "kernel_params": "x", H + "default_memory": "1"}
    with pytest.raises(ConfigError, match="default_memory is not enabled"):
        apply_annotations(cfg, annotations)
