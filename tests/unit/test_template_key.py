"""Template keys: what makes two VMs interchangeable, and what keeps a VM from being templated."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kata.factory.template import templatable, template_key
from kata.hypervisor.base import SharedFs, VMConfig


def config(tmp_path: Path, **over: object) -> VMConfig:
    kernel = tmp_path / "vmlinux"
    image = tmp_path / "image"
    for f in (kernel, image):
        if not f.exists():
            f.write_bytes(b"x")
    base = VMConfig(
        id="a", hypervisor_path=Path("/bin/sh"), kernel=kernel, image=image, initrd=None,
        kernel_params=("console=ttyS0",), vcpus=1, max_vcpus=1, memory_mib=512, max_memory_mib=512,
        machine_type="microvm", accel="tcg", agent_channel="virtio-serial", run_dir=tmp_path / "run-a",
        shared_fs=SharedFs("virtio-9p", tmp_path / "share-a"),
    )
    return dataclasses.replace(base, **over)  # type: ignore[arg-type]


def test_per_sandbox_fields_do_not_change_the_key(tmp_path: Path) -> None:
    a = config(tmp_path)
    b = config(tmp_path, id="b", run_dir=tmp_path / "run-b",
               shared_fs=SharedFs("virtio-9p", tmp_path / "share-b"))
    assert template_key(a) == template_key(b)
    fs_a = SharedFs("virtio-fs", tmp_path / "a", vhost_user_socket=tmp_path / "a.sock", hotplug=True)
    fs_b = SharedFs("virtio-fs", tmp_path / "b", vhost_user_socket=tmp_path / "b.sock", hotplug=True)
    assert template_key(config(tmp_path, shared_fs=fs_a)) == template_key(config(tmp_path, shared_fs=fs_b))


def test_shape_and_assets_change_the_key(tmp_path: Path) -> None:
    a = config(tmp_path)
    assert template_key(a) != template_key(config(tmp_path, memory_mib=1024, max_memory_mib=1024))
    assert template_key(a) != template_key(config(tmp_path, vcpus=2, max_vcpus=2))
    assert template_key(a) != template_key(config(tmp_path, kernel_params=("console=ttyS0", "quiet")))
    before = template_key(a)
    (tmp_path / "image").write_bytes(b"a rebuilt image")
    assert template_key(a) != before


def test_what_cannot_be_templated(tmp_path: Path) -> None:
    assert templatable(config(tmp_path)) is None
    virtiofs = SharedFs("virtio-fs", tmp_path, vhost_user_socket=tmp_path / "s")
    assert "virtio-fs" in str(templatable(config(tmp_path, shared_fs=virtiofs)))
    hot_added = SharedFs("virtio-fs", tmp_path, vhost_user_socket=tmp_path / "s", hotplug=True)
    assert templatable(config(tmp_path, shared_fs=hot_added)) is None
    assert "vsock" in str(templatable(config(tmp_path, agent_channel="vsock")))


def test_prune_drops_templates_of_replaced_assets(tmp_path: Path) -> None:
    import json

    from kata.factory.template import TEMPLATE_FORMAT, TemplateStore, _asset_identities, shape_digest

    cfg = config(tmp_path)
    store = TemplateStore(tmp_path / "templates")
    for key in ("current", "stale", "old-layout", "old-argv", "other-shape"):
        (store.root / key).mkdir(parents=True)
        (store.root / key / "state").write_bytes(b"x")
        shape = shape_digest(cfg) if key != "other-shape" else "another shape"
        meta = {"assets": _asset_identities(cfg), "format": TEMPLATE_FORMAT, "shape": shape}
        (store.root / key / "meta.json").write_text(json.dumps(meta))
    stale_meta = store.root / "stale" / "meta.json"
    assets = json.loads(stale_meta.read_text())["assets"]
    assets[str(cfg.image)] = "an image that has since been rebuilt"
    stale_meta.write_text(json.dumps({"assets": assets, "format": TEMPLATE_FORMAT}))
    (store.root / "old-layout" / "meta.json").write_text(json.dumps({"assets": _asset_identities(cfg)}))
    (store.root / "legacy").mkdir()  # made before templates kept a record: cannot be checked
    (store.root / "legacy" / "state").write_bytes(b"x")
    (store.root / "making" / "work").mkdir(parents=True)  # another process is making this one
    (store.root / "gone.lock").touch()
    # "current" was just made: "old-argv" is the same shape under the key of an older command line.
    assert store.prune(replacing=(shape_digest(cfg), "current")) == 4
    assert [key for key, _ in store.list()] == ["current", "other-shape"]
    assert (store.root / "making").is_dir() and not (store.root / "gone.lock").exists()


def test_a_new_device_in_the_command_line_changes_the_key(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot holds the devices it was made with: another argv (say, a new root port) needs a
    new template, or the restore would fail."""
    from kata.hypervisor import qemu_argv

    cfg = config(tmp_path)
    before = template_key(cfg)
    real = qemu_argv.build_argv
    monkeypatch.setattr(qemu_argv, "build_argv",
                        lambda c, *a, **k: [*real(c, *a, **k), "-device", "pcie-root-port,id=extra"])
    assert template_key(cfg) != before
    monkeypatch.undo()
    assert template_key(cfg) == before
