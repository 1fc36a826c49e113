"""Pure parts of the rootfs builder: control-file parsing, dependency resolution, hashing, manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from kata.osbuilder.cache import InputsHash
from kata.osbuilder.debian import DebPackage, PackageError, parse_relations, parse_stanzas, resolve
from kata.osbuilder.rootfs import RootfsSpec, compute_hashes, guest_code_files

SHOW = """Package: python3.11-minimal
Version: 3.11.2-6
Architecture: amd64
Pre-Depends: libc6 (>= 2.35)
Depends: libpython3.11-minimal (= 3.11.2-6), zlib1g (>= 1:1.2.0)
Description: minimal
 continued line

Package: zlib1g
Version: 1:1.2.13
Architecture: amd64
Depends: libc6 (>= 2.14)
"""


def pkg(name: str, deps: str = "", version: str = "1") -> DebPackage:
    return DebPackage(name, version, "amd64", parse_relations(deps), f"pool/{name}.deb", "00")


def test_parse_stanzas_joins_continuations() -> None:
    st = parse_stanzas(SHOW)
    assert [s["Package"] for s in st] == ["python3.11-minimal", "zlib1g"]
    assert st[0]["Description"] == "minimal\ncontinued line"


def test_parse_relations_drops_versions_and_qualifiers() -> None:
    assert parse_relations("a (>= 1), b:any | c [amd64], d <!nocheck>") == (("a",), ("b", "c"), ("d",))


def test_deb_name_quotes_epoch() -> None:
    assert pkg("zlib1g", version="1:1.2").deb_name == "zlib1g_1%3a1.2_amd64.deb"


def test_resolve_closure_alternatives_and_exclusions() -> None:
    repo = {
        "app": pkg("app", "libc6, media-types | mime-support, vbox | real, big"),
        "libc6": pkg("libc6", "libgcc-s1"),
        "libgcc-s1": pkg("libgcc-s1", "libc6"),
        "real": pkg("real"),
        "big": pkg("big", "huge"),
        "huge": pkg("huge"),
    }
    calls: list[list[str]] = []

    def query(names: list[str]) -> dict[str, DebPackage]:
        calls.append(names)
        return {n: repo[n] for n in names if n in repo}

    got = resolve(["app"], ["media-types", "mime-support", "big"], query)
    assert [p.name for p in got] == ["app", "libc6", "libgcc-s1", "real"]


def test_resolve_reports_missing() -> None:
    with pytest.raises(PackageError, match="nothing"):
        resolve(["x"], [], lambda names: {"x": pkg("x", "nothing")} if "x" in names else {})


def test_inputs_hash_is_stable_and_label_separated() -> None:
    a = InputsHash("k").add("x", "ab").add("y", "c").hexdigest()
    assert a == InputsHash("k").add("x", "ab").add("y", "c").hexdigest()
    assert a != InputsHash("k").add("x", "a").add("y", "bc").hexdigest()
    assert len(a) == 16


def test_image_hash_follows_guest_code_but_base_does_not(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("A = 1\n")
    b = tmp_path / "rootfs.py"
    b.write_text("builder")
    spec = RootfsSpec()
    args = ([pkg("libc6")], [(tmp_path / "w.whl", "ff")], [("kata/m.py", f)], [("rootfs.py", b)])
    base1, img1 = compute_hashes(spec, *args)
    f.write_text("A = 2\n")
    base2, img2 = compute_hashes(spec, *args)
    assert base1 == base2 and img1 != img2
    base3, _ = compute_hashes(spec, [pkg("libc6", version="2")], *args[1:])
    assert base3 != base1


def test_guest_code_files_sorted_and_skips(tmp_path: Path) -> None:
    for rel in ("kata/__init__.py", "kata/protocols/build.py", "kata/protocols/a_pb2.py",
                "kata/protocols/__pycache__/x.py"):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    spec = RootfsSpec(guest_code=("kata/__init__.py", "kata/protocols"))
    assert [r for r, _ in guest_code_files(spec, tmp_path)] == ["kata/__init__.py", "kata/protocols/a_pb2.py"]


def test_prune_others_keeps_the_current_build_and_the_links(tmp_path: Path) -> None:
    from kata.osbuilder.install import link_atomically, prune_others

    current = tmp_path / "kata-containers-new.img"
    for name in ("kata-containers-new.img", "kata-containers-old1.img", "kata-containers-old2.img",
                 "vmlinux-abc"):
        (tmp_path / name).write_bytes(b"x")
    link_atomically(tmp_path / "kata-containers.img", current)
    assert sorted(prune_others(current, "kata-containers-*.img")) == [
        "kata-containers-old1.img", "kata-containers-old2.img"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kata-containers-new.img", "kata-containers.img", "vmlinux-abc"]


def test_a_kernel_build_removes_older_kernels_and_their_trees(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from kata.osbuilder import __main__ as osbuilder
    from kata.osbuilder import kernel

    new, old = "0123456789abcdef", "fedcba9876543210"
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    # Beside ours, an operator's: a host kernel and headers, which only look alike.
    for name in (f"vmlinux-{old}", f"vmlinux-{new}", "kata-containers-x.img", "vmlinux-6.1.0-amd64"):
        (out / name).write_bytes(b"x")
    for name in (f"linux-{old}", f"linux-{new}", "rootfs-base-1", "linux-headers-6.1.0-amd64"):
        (cache / name).mkdir(parents=True)
    monkeypatch.setattr(kernel, "build_kernel", lambda out_dir, *a, **k: out_dir / f"vmlinux-{new}")
    argv = ["build", "--kernel-only", "--output-dir", str(out), "--cache-dir", str(cache)]
    assert osbuilder.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["kata-containers-x.img", "vmlinux-6.1.0-amd64",
                                                            f"vmlinux-{new}", "vmlinux.container"])
    assert sorted(p.name for p in cache.iterdir()) == sorted([f"linux-{new}", "linux-headers-6.1.0-amd64",
                                                              "rootfs-base-1"])
