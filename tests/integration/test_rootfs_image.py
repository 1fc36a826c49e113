"""Build the guest root image (shared cache: fast after the first run) and check what is in it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata.osbuilder.rootfs import ENTRY_PATH, MANIFEST_PATH, RootfsSpec, build_rootfs, resolve_inputs

CACHE = Path(os.environ.get("KATA_OSBUILDER_CACHE", "/var/cache/kata-containers/osbuilder"))

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mkfs.erofs") is None or shutil.which("apt-get") is None,
    reason="needs root, apt and erofs-utils",
)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_rootfs(tmp_path_factory.mktemp("img"), CACHE, RootfsSpec(), log=lambda _m: None)


@pytest.fixture(scope="module")
def tree(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The image's files, extracted with fsck.erofs (no loop mount needed)."""
    out = tmp_path_factory.mktemp("tree") / "root"
    subprocess.run(
        ["fsck.erofs", f"--extract={out}", str(image)], check=True, capture_output=True, timeout=120
    )
    yield out


def test_image_is_named_by_its_inputs(image: Path) -> None:
    inputs = resolve_inputs(RootfsSpec(), CACHE)
    assert image.name == inputs.image_name


def test_rebuild_gives_the_same_bytes(image: Path, tmp_path: Path) -> None:
    again = build_rootfs(tmp_path, CACHE, RootfsSpec(), log=lambda _m: None)
    assert again.name == image.name
    assert again.read_bytes() == image.read_bytes()


def test_contains_python_crun_busybox_and_entry(tree: Path) -> None:
    for rel in ("usr/bin/python3.11", "usr/bin/crun", "bin/busybox", ENTRY_PATH):
        assert (tree / rel).is_file(), rel
    assert os.readlink(tree / "usr/bin/python3") == "python3.11"
    assert os.readlink(tree / "bin/ip") == "busybox"
    entry = (tree / ENTRY_PATH).read_text()
    assert entry.startswith("#!/usr/bin/python3.11 -IS\n")
    assert "from kata.guest.agent.main import main" in entry
    for d in ("proc", "sys", "dev", "run", "tmp", "mnt"):
        assert (tree / d).is_dir(), d


def test_contains_kata_code_and_protobuf_with_pyc(tree: Path) -> None:
    site = tree / "usr/lib/kata-agent"
    for rel in (
        "kata/__init__.py",
        "kata/ttrpc/__init__.py",
        "kata/protocols/agent_api.py",
        "kata/guest/__init__.py",
    ):
        assert (site / rel).is_file(), rel
    assert list((site / "kata/protocols").glob("*_pb2.py"))
    assert list((site / "google/_upb").glob("_message*.so"))
    assert (site / "kata/ttrpc/__pycache__/__init__.cpython-311.pyc").is_file()
    assert (tree / "usr/lib/python3.11/__pycache__/json.cpython-311.pyc").exists() or (
        tree / "usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc"
    ).is_file()
    assert not (tree / "usr/lib/python3.11/test").exists()
    assert not (tree / "usr/share/doc").exists()


def test_manifest_records_resolved_versions(tree: Path, image: Path) -> None:
    man = json.loads((tree / MANIFEST_PATH).read_text())
    names = {p["name"]: p["version"] for p in man["packages"]}
    assert {"python3.11-minimal", "crun", "busybox-static", "libc6"} <= names.keys()
    assert man["image_hash"] in image.name
    assert man["wheels"][0]["file"].startswith("protobuf-7.36.2-")


def test_guest_python_imports_agent_stack_in_chroot(tree: Path) -> None:
    """The guest's own interpreter, with its own libraries: upb must load (libstdc++ is in the image)."""
    code = (
        "import sys; sys.path.insert(0, '/usr/lib/kata-agent');"
        "import json, socket, threading, ctypes, struct, signal, select, fcntl, termios, pty, subprocess;"
        "import kata.ttrpc, kata.protocols.agent_pb2;"
        "from google.protobuf.internal import api_implementation as a; print(a.Type())"
    )
    res = subprocess.run(
        ["chroot", str(tree), "/usr/bin/python3", "-IS", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "upb"


def test_guest_libseccomp_is_the_one_host_compiled_filters_assume(tree: Path) -> None:
    """kata.oci.seccomp_bpf uses the host's libseccomp only if it is at least the guest's: the
    version it assumes must be the image's."""
    from kata.oci.seccomp_bpf import GUEST_LIBSECCOMP

    libs = sorted(p.name for p in tree.glob("usr/lib/x86_64-linux-gnu/libseccomp.so.2.*"))
    assert libs == ["libseccomp.so.2." + ".".join(map(str, GUEST_LIBSECCOMP[1:]))], libs
