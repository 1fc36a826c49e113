"""The fragment checker: the only guard against olddefconfig silently dropping a wanted option."""

from pathlib import Path

import pytest

from kata.hypervisor.host import tcg_kernel_params
from kata.osbuilder import kernel
from kata.osbuilder.kernel import (
    FRAGMENT_PATH,
    KernelBuildError,
    apply_patches,
    kernel_inputs_hash,
    kernel_patches,
    missing_options,
)
from kata.sandbox.vm import GUEST_KERNEL_PARAMS as KERNEL_PARAMS

FRAGMENT = """\
# comment
CONFIG_BLOCK=y
CONFIG_VIRTIO_BLK=y
CONFIG_NR_CPUS=64
# CONFIG_VT is not set
CONFIG_FOO=n
"""


def test_all_present() -> None:
    config = "CONFIG_BLOCK=y\nCONFIG_VIRTIO_BLK=y\nCONFIG_NR_CPUS=64\n# CONFIG_VT is not set\n"
    assert missing_options(FRAGMENT, config) == []


def test_dropped_option_is_reported() -> None:
    config = "CONFIG_BLOCK=y\n# CONFIG_VIRTIO_BLK is not set\nCONFIG_NR_CPUS=64\n"
    assert missing_options(FRAGMENT, config) == ["CONFIG_VIRTIO_BLK=y"]


def test_changed_value_is_reported() -> None:
    config = "CONFIG_BLOCK=y\nCONFIG_VIRTIO_BLK=y\nCONFIG_NR_CPUS=8\n"
    assert missing_options(FRAGMENT, config) == ["CONFIG_NR_CPUS=64"]


def test_module_instead_of_builtin_is_reported() -> None:
    config = "CONFIG_BLOCK=y\nCONFIG_VIRTIO_BLK=m\nCONFIG_NR_CPUS=64\n"
    assert missing_options(FRAGMENT, config) == ["CONFIG_VIRTIO_BLK=y"]


def test_empty_config_reports_everything_wanted() -> None:
    assert missing_options(FRAGMENT, "") == ["CONFIG_BLOCK=y", "CONFIG_VIRTIO_BLK=y", "CONFIG_NR_CPUS=64"]


def test_shipped_fragment_names_the_required_options() -> None:
    text = FRAGMENT_PATH.read_text()
    for opt in ("BLOCK", "PVH", "VIRTIO_MMIO_CMDLINE_DEVICES", "VIRTIO_FS", "9P_FS", "EROFS_FS", "SLUB"):
        assert f"CONFIG_{opt}=y" in text
    assert "# CONFIG_VT is not set" in text
    assert "# CONFIG_MODULES is not set" in text


def test_inputs_hash_is_stable_hex() -> None:
    h = kernel_inputs_hash()
    assert h == kernel_inputs_hash()
    assert len(h) == 16 and int(h, 16) >= 0
    assert "console=ttyS0" in KERNEL_PARAMS


def test_tcg_params_take_tsc_rate_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu MHz\t\t: 2100.000\n")
    assert tcg_kernel_params(info) == ("tsc_early_khz=2100000",)
    info.write_text("processor\t: 0\n")
    assert tcg_kernel_params(info) == ()
    assert tcg_kernel_params(tmp_path / "absent") == ()


PATCH = """\
--- a/drivers/x.c
+++ b/drivers/x.c
@@ -1,3 +1,3 @@
 one
-two
+TWO
 three
"""


def test_patches_apply_in_a_tree(tmp_path: Path) -> None:
    (tmp_path / "drivers").mkdir()
    (tmp_path / "drivers/x.c").write_text("one\ntwo\nthree\n")
    patch = tmp_path / "0001-x.patch"
    patch.write_text(PATCH)
    apply_patches(tmp_path, [patch], log=lambda _: None)
    assert (tmp_path / "drivers/x.c").read_text() == "one\nTWO\nthree\n"
    # Applied twice (a tree patched already): refused, never reversed.
    with pytest.raises(KernelBuildError, match="0001-x.patch does not apply"):
        apply_patches(tmp_path, [patch], log=lambda _: None)
    assert (tmp_path / "drivers/x.c").read_text() == "one\nTWO\nthree\n"


def test_patch_that_does_not_match_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "drivers").mkdir()
    (tmp_path / "drivers/x.c").write_text("something else\n")
    patch = tmp_path / "0001-x.patch"
    patch.write_text(PATCH)
    with pytest.raises(KernelBuildError, match="0001-x.patch does not apply"):
        apply_patches(tmp_path, [patch], log=lambda _: None)


def test_shipped_patches_are_part_of_the_kernel_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shipped = kernel_patches()
    assert [p.name for p in shipped] == ["0001-virtio-console-bounded-receive-buffers.patch",
                                         "0002-pci-no-link-settle-time-behind-qemu-ports.patch"]
    assert "drivers/char/virtio_console.c" in shipped[0].read_text()
    assert "drivers/pci/pci.c" in shipped[1].read_text()
    before = kernel_inputs_hash()
    for p in shipped:
        (tmp_path / p.name).write_text(p.read_text().replace("MAX_FILL_BUFS 64", "MAX_FILL_BUFS 32"))
    monkeypatch.setattr(kernel, "PATCH_DIR", tmp_path)
    assert kernel_inputs_hash() != before
