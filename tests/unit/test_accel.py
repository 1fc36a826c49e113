"""Accelerator choice and its cache, with the boot probe replaced by a recorder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kata.hypervisor import accel
from kata.hypervisor.accel import choose_accel


class Recorder:
    def __init__(self, result: tuple[accel.Accel, str]) -> None:
        self.result = result
        self.calls = 0

    def __call__(self, qemu: Path, kernel: Path) -> tuple[accel.Accel, str]:
        self.calls += 1
        return self.result


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    qemu = tmp_path / "qemu"
    kernel = tmp_path / "vmlinux"
    qemu.write_text("q")
    kernel.write_text("k")
    # The probe path needs /dev/kvm; pretend it exists whatever the test host has.
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda p: True if str(p) == "/dev/kvm" else real_exists(p))
    return qemu, kernel, tmp_path / "cache" / "accel.json"


def test_probe_once_then_cached(files: tuple[Path, Path, Path]) -> None:
    qemu, kernel, cache = files
    probe = Recorder(("tcg", "guest silent under KVM"))
    first = choose_accel(qemu, kernel, cache, probe=probe)
    assert (first.accel, first.reason, first.cached) == ("tcg", "guest silent under KVM", False)
    second = choose_accel(qemu, kernel, cache, probe=probe)
    assert (second.accel, second.reason, second.cached) == ("tcg", "guest silent under KVM", True)
    assert probe.calls == 1


def test_kernel_change_invalidates_cache(files: tuple[Path, Path, Path]) -> None:
    qemu, kernel, cache = files
    choose_accel(qemu, kernel, cache, probe=Recorder(("tcg", "x")))
    kernel.write_text("a new kernel")
    os.utime(kernel, ns=(1, 10**18))
    probe = Recorder(("kvm", "ran"))
    result = choose_accel(qemu, kernel, cache, probe=probe)
    assert (result.accel, result.cached, probe.calls) == ("kvm", False, 1)
    # Both answers are kept: switching back to the old kernel is free again.
    assert len(json.loads(cache.read_text())) == 2


def test_qemu_change_invalidates_cache(files: tuple[Path, Path, Path]) -> None:
    qemu, kernel, cache = files
    choose_accel(qemu, kernel, cache, probe=Recorder(("kvm", "ran")))
    qemu.write_text("upgraded qemu")
    probe = Recorder(("tcg", "no"))
    assert choose_accel(qemu, kernel, cache, probe=probe).accel == "tcg"
    assert probe.calls == 1


def test_force_skips_probe_and_cache(files: tuple[Path, Path, Path]) -> None:
    qemu, kernel, cache = files
    probe = Recorder(("tcg", "x"))
    assert choose_accel(qemu, kernel, cache, force="kvm", probe=probe).accel == "kvm"
    assert choose_accel(qemu, kernel, cache, force="tcg", probe=probe).accel == "tcg"
    assert probe.calls == 0
    assert not cache.exists()


def test_corrupt_cache_is_reprobed(files: tuple[Path, Path, Path]) -> None:
    qemu, kernel, cache = files
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    probe = Recorder(("kvm", "ran"))
    assert choose_accel(qemu, kernel, cache, probe=probe).accel == "kvm"
    assert choose_accel(qemu, kernel, cache, probe=probe).cached


def test_missing_kernel_is_not_cached(files: tuple[Path, Path, Path]) -> None:
    qemu, kernel, cache = files
    probe = Recorder(("kvm", "ran"))
    result = choose_accel(qemu, kernel.with_name("absent"), cache, probe=probe)
    assert (result.accel, result.cached, probe.calls) == ("tcg", False, 0)
    assert "absent" in result.reason
    assert not cache.exists()


def test_unwritable_cache_still_answers(files: tuple[Path, Path, Path]) -> None:
    qemu, kernel, _ = files
    blocker = kernel.parent / "file"
    blocker.write_text("")
    result = choose_accel(qemu, kernel, blocker / "accel.json", probe=Recorder(("kvm", "ran")))
    assert result.accel == "kvm"


def test_no_dev_kvm_means_tcg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda p: False if str(p) == "/dev/kvm" else real_exists(p))
    probe = Recorder(("kvm", "ran"))
    result = choose_accel(tmp_path / "q", tmp_path / "k", tmp_path / "c.json", probe=probe)
    assert (result.accel, result.reason, probe.calls) == ("tcg", "no /dev/kvm", 0)


def test_host_capabilities_is_typed() -> None:
    caps = accel.host_capabilities()
    assert isinstance(caps.dev_kvm, bool)
    assert caps.kvm_module in ("pvm", "intel", "amd", "none")
