"""The guest root filesystem: a declarative spec, resolved to hashed inputs, built in two cached stages.

Stage 1 (the "base", cached per package set and builder code): Debian packages unpacked, stripped, the stdlib
precompiled. Stage 2 (the image, cached per all inputs): base + protobuf wheel + our guest code + the agent
entry script + a manifest, precompiled and packed into erofs. Changing an agent file reruns only stage 2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import kata
from kata.osbuilder import debian, wheel
from kata.osbuilder.cache import InputsHash, sha256_file
from kata.osbuilder.image import ErofsOptions, make_erofs

Log = Callable[[str], None]

SOURCE_ROOT = Path(kata.__file__).resolve().parent.parent
MANIFEST_PATH = "usr/share/kata-containers/osbuilder.manifest.json"
ENTRY_PATH = "usr/bin/kata-agent"
AGENT_MODULE = "kata.guest.agent.main"
BASE_COMPLETE = ".osbuilder-base-complete"
# The builder modules whose code shapes the image (not the CLI or the progress display).
_BUILDER_MODULES = ("cache.py", "debian.py", "image.py", "rootfs.py", "wheel.py")


class RootfsError(RuntimeError):
    """A one-line reason why the guest root could not be built."""


@dataclass(frozen=True)
class RootfsSpec:
    """Everything that decides the guest root. Defaults describe the Kata guest."""

    # busybox-static gives `ip` and a debugging shell; crun runs the containers; libstdc++6 is what the
    # protobuf wheel's upb extension links against (without it protobuf falls back to pure Python).
    packages: tuple[str, ...] = (
        "python3.11-minimal", "libpython3.11-stdlib", "crun", "busybox-static", "libstdc++6",
    )  # fmt: skip
    # Dependencies only of stdlib parts removed below (readline, curses, sqlite3, dbm, nis, mimetypes data).
    exclude_packages: tuple[str, ...] = (
        "media-types", "mime-support", "libdb5.3", "libncursesw6", "libtinfo6", "libreadline8",
        "libsqlite3-0", "libnsl2", "libtirpc3",
    )  # fmt: skip
    python: str = "python3.11"
    # Paths (globs relative to the root) that no guest program uses.
    strip: tuple[str, ...] = (
        "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
        "usr/share/bug", "usr/share/gcc", "usr/share/bash-completion", "usr/share/zsh", "usr/share/gdb",
        "usr/share/binfmts",
        "usr/share/applications", "usr/share/pixmaps", "usr/lib/x86_64-linux-gnu/gconv",
        "usr/include", "usr/lib/x86_64-linux-gnu/*.a", "usr/lib/x86_64-linux-gnu/pkgconfig",
        "usr/lib/python3.11/test", "usr/lib/python3.11/idlelib", "usr/lib/python3.11/tkinter",
        "usr/lib/python3.11/turtledemo", "usr/lib/python3.11/ensurepip", "usr/lib/python3.11/lib2to3",
        "usr/lib/python3.11/pydoc_data", "usr/lib/python3.11/distutils", "usr/lib/python3.11/unittest",
        "usr/lib/python3.11/sqlite3", "usr/lib/python3.11/curses", "usr/lib/python3.11/dbm",
        "usr/lib/python3.11/venv", "usr/lib/python3.11/turtle.py", "usr/lib/python3.11/__phello__",
        "usr/lib/python3.11/config-3.11-x86_64-linux-gnu", "usr/lib/python3.11/*/tests",
        "usr/lib/python3.11/*/test",
        "usr/lib/python3.11/lib-dynload/_sqlite3.*", "usr/lib/python3.11/lib-dynload/_dbm.*",
        "usr/lib/python3.11/lib-dynload/_gdbm.*", "usr/lib/python3.11/lib-dynload/_curses*",
        "usr/lib/python3.11/lib-dynload/readline.*", "usr/lib/python3.11/lib-dynload/nis.*",
        "usr/lib/python3.11/lib-dynload/_test*", "usr/lib/python3.11/lib-dynload/_ctypes_test.*",
        "usr/lib/python3.11/lib-dynload/xxlimited*", "usr/lib/python3.11/lib-dynload/_xxtestfuzz.*",
        "usr/lib/python3.11/lib-dynload/_tkinter.*",
    )  # fmt: skip
    wheels: tuple[wheel.WheelSpec, ...] = (wheel.WheelSpec("protobuf==7.36.2"),)
    # Source-tree paths of our guest code (files, or directories copied with their .py files).
    guest_code: tuple[str, ...] = (
        "kata/__init__.py", "kata/ttrpc", "kata/protocols", "kata/oci/__init__.py",
        "kata/oci/default_spec.py", "kata/oci/sysctls.py", "kata/oci/crun_annotations.py",
        "kata/utils/__init__.py", "kata/utils/mount.py", "kata/utils/procfs.py",
        "kata/utils/mountapi.py", "kata/utils/safepath.py", "kata/utils/ids.py", "kata/utils/text.py",
        "kata/utils/rtnetlink.py", "kata/guest",
    )  # fmt: skip
    # Files, or directories skipped whole: the host's build tools and containerd's and CRI's APIs.
    guest_code_skip: tuple[str, ...] = ("kata/protocols/build.py", "kata/protocols/containerd_protos.py",
                                        "kata/protocols/containerd", "kata/protocols/cgroups",
                                        "kata/protocols/cri")
    site_dir: str = "usr/lib/kata-agent"
    mount_points: tuple[str, ...] = ("proc", "sys", "dev", "run", "tmp", "mnt", "root", "var/tmp", "etc")
    erofs: ErofsOptions = field(default_factory=ErofsOptions)


@dataclass(frozen=True)
class ResolvedInputs:
    spec: RootfsSpec
    packages: tuple[debian.DebPackage, ...]
    wheels: tuple[tuple[Path, str], ...]  # (file, sha256)
    guest_files: tuple[tuple[str, Path], ...]  # (path in the site dir, source file)
    base_hash: str
    image_hash: str

    @property
    def image_name(self) -> str:
        return f"kata-containers-{self.image_hash}.img"


def _protos_stale(src_root: Path) -> bool:
    for proto in (src_root / "kata" / "protocols").rglob("*.proto"):
        gen = proto.with_name(proto.stem + "_pb2.py")
        if not gen.exists() or gen.stat().st_mtime < proto.stat().st_mtime:
            return True
    return False


def ensure_protocols(src_root: Path) -> None:
    """Generate the *_pb2.py modules when missing or older than their .proto: the guest needs them."""
    if not _protos_stale(src_root):
        return
    res = subprocess.run(
        [sys.executable, "-m", "kata.protocols.build"], cwd=src_root, capture_output=True, text=True
    )
    if res.returncode != 0:
        raise RootfsError(f"python -m kata.protocols.build failed: {res.stderr.strip()[-200:]}")


def guest_code_files(spec: RootfsSpec, src_root: Path) -> list[tuple[str, Path]]:
    files: dict[str, Path] = {}
    for entry in spec.guest_code:
        path = src_root / entry
        if path.is_dir():
            found = [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        elif path.is_file():
            found = [path]
        else:
            raise RootfsError(f"guest code path {entry} does not exist in {src_root}")
        for p in found:
            rel = p.relative_to(src_root).as_posix()
            if not any(rel == s or rel.startswith(s + "/") for s in spec.guest_code_skip):
                files[rel] = p
    return sorted(files.items())


def builder_files() -> list[tuple[str, Path]]:
    here = Path(__file__).resolve().parent
    return [(name, here / name) for name in _BUILDER_MODULES]


def compute_hashes(
    spec: RootfsSpec,
    packages: list[debian.DebPackage],
    wheels: list[tuple[Path, str]],
    guest_files: list[tuple[str, Path]],
    builder: list[tuple[str, Path]],
) -> tuple[str, str]:
    """(base hash, image hash): the base depends on packages and builder code, the image on everything."""
    base = InputsHash("kata-rootfs-base")
    for p in packages:
        base.add("deb", f"{p.name}={p.version} {p.architecture} {p.sha256}")
    base.add("exclude", " ".join(spec.exclude_packages))
    base.add("strip", "\n".join(spec.strip)).add("python", spec.python)
    base.add("mounts", " ".join(spec.mount_points)).add_files("builder", builder)
    base_hash = base.hexdigest()
    image = InputsHash("kata-rootfs-image").add("base", base_hash)
    for path, digest in wheels:
        image.add("wheel", f"{path.name} {digest}")
    image.add_files("guest", guest_files).add("site", spec.site_dir).add("erofs", repr(spec.erofs))
    return base_hash, image.hexdigest()


def resolve_inputs(spec: RootfsSpec, cache_dir: Path, src_root: Path = SOURCE_ROOT) -> ResolvedInputs:
    """Pin every input (apt's candidate versions now, the wheel file, the guest sources) and hash them."""
    debian.require_tools()
    ensure_protocols(src_root)
    packages = debian.resolve(spec.packages, spec.exclude_packages)
    wheels = []
    for w in spec.wheels:
        path = wheel.fetch(w, cache_dir / "wheels")
        wheels.append((path, wheel.wheel_digest(path)))
    guest = guest_code_files(spec, src_root)
    base_hash, image_hash = compute_hashes(spec, packages, wheels, guest, builder_files())
    return ResolvedInputs(spec, tuple(packages), tuple(wheels), tuple(guest), base_hash, image_hash)


def _rm(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def strip_tree(root: Path, patterns: tuple[str, ...]) -> int:
    removed = 0
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            _rm(path)
            removed += 1
    return removed


def _compile(root: Path, dirs: list[Path], log: Log) -> None:
    """Precompile to unchecked-hash .pyc: Debian ships none, and without them imports are 4-5x slower."""
    res = subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j0", "--invalidation-mode", "unchecked-hash",
         "-s", str(root), "-p", "/", *map(str, dirs)],
        capture_output=True, text=True,
    )  # fmt: skip
    if res.returncode != 0:
        out = (res.stdout + res.stderr).strip().splitlines()
        raise RootfsError(f"compileall failed: {out[-1] if out else 'no output'}")


def guest_magic(root: Path, python: str) -> bytes:
    """The guest interpreter's bytecode magic, asked from the guest binary itself (chroot)."""
    res = subprocess.run(
        ["chroot", str(root), f"/usr/bin/{python}", "-S", "-c",
         "import importlib.util,sys; sys.stdout.write(importlib.util.MAGIC_NUMBER.hex())"],
        capture_output=True, text=True,
    )  # fmt: skip
    if res.returncode != 0:
        raise RootfsError(f"cannot run the guest {python} in a chroot: {res.stderr.strip()[-200:]}")
    return bytes.fromhex(res.stdout.strip())


def _host_magic() -> bytes:
    import importlib.util

    return importlib.util.MAGIC_NUMBER


def _postinst(root: Path, spec: RootfsSpec) -> None:
    """What the maintainer scripts and base-files would have made, reduced to what the guest uses."""
    for d in spec.mount_points:
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "var/tmp", 0o1777)
    os.chmod(root / "root", 0o700)
    (root / "usr/bin/python3").symlink_to(spec.python)
    etc = root / "etc"
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\n")
    (etc / "ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
    # Kernel opens /dev/console before init; devtmpfs covers /dev when mounted, these are the fallback.
    if os.geteuid() == 0:
        os.mknod(root / "dev/console", 0o600 | stat.S_IFCHR, os.makedev(5, 1))
        os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    _busybox_links(root)
    res = subprocess.run(["ldconfig", "-r", str(root)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RootfsError(f"ldconfig -r failed: {res.stderr.strip()[-200:]}")


def _busybox_links(root: Path) -> None:
    """busybox --install, without running anything in the guest: link every applet the packages lack."""
    busybox = root / "bin/busybox"
    if not busybox.exists():
        return
    res = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True)
    existing = {
        p.name
        for d in ("bin", "sbin", "usr/bin", "usr/sbin")
        if (root / d).is_dir()
        for p in (root / d).iterdir()
    }
    for applet in sorted(set(res.stdout.split())):
        if re.fullmatch(r"[\w.\-\[]+", applet) and applet not in existing:
            (root / "bin" / applet).symlink_to("busybox")


def build_base(inputs: ResolvedInputs, cache_dir: Path, log: Log) -> Path:
    """The unpacked, stripped, precompiled package tree (cached by base hash)."""
    spec = inputs.spec
    base = cache_dir / f"rootfs-base-{inputs.base_hash}"
    if (base / BASE_COMPLETE).exists():
        return base
    debs = debian.download(list(inputs.packages), cache_dir / "debs", log)
    tmp = cache_dir / f".rootfs-base-{inputs.base_hash}.{os.getpid()}"
    _rm(tmp)
    try:
        log(f"unpacking {len(debs)} packages")
        debian.extract(debs, tmp)
        log(f"stripping ({strip_tree(tmp, spec.strip)} paths)")
        _postinst(tmp, spec)
        magic = guest_magic(tmp, spec.python)
        if magic != _host_magic():
            raise RootfsError(
                f"guest {spec.python} bytecode magic {magic.hex()} != host {_host_magic().hex()}: "
                "build with the guest's Python version"
            )
        log("precompiling the stdlib")
        _compile(tmp, [tmp / "usr/lib" / spec.python], log)
        (tmp / BASE_COMPLETE).write_text(inputs.base_hash + "\n")
        _rm(base)
        tmp.rename(base)
    finally:
        _rm(tmp)
    return base


ENTRY_SCRIPT = """#!/usr/bin/{python} -IS
# Kata guest agent, started by the kernel as init. -I -S: no site, no environment, no user paths, so
# start-up touches nothing but the stdlib and the directory below.
import sys
sys.path.insert(0, "/{site_dir}")
from {module} import main
sys.exit(main())
"""


def manifest(inputs: ResolvedInputs) -> dict[str, object]:
    spec = inputs.spec
    return {
        "format": 1,
        "image_hash": inputs.image_hash,
        "base_hash": inputs.base_hash,
        "python": spec.python,
        "entry": "/" + ENTRY_PATH,
        "site_dir": "/" + spec.site_dir,
        "erofs": asdict(spec.erofs),
        "packages": [{"name": p.name, "version": p.version, "sha256": p.sha256} for p in inputs.packages],
        "excluded_packages": list(spec.exclude_packages),
        "wheels": [{"file": p.name, "sha256": d} for p, d in inputs.wheels],
        "guest_code": [{"path": rel, "sha256": sha256_file(p)} for rel, p in inputs.guest_files],
    }


def assemble(inputs: ResolvedInputs, base: Path, tree: Path, log: Log) -> None:
    spec = inputs.spec
    # cp -a, not shutil.copytree: the base holds device nodes, which copytree would open and read.
    res = subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(tree)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RootfsError(f"copying the base tree failed: {res.stderr.strip()[-200:]}")
    (tree / BASE_COMPLETE).unlink()
    site = tree / spec.site_dir
    for path, _ in inputs.wheels:
        wheel.unpack(path, site)
    for rel, src in inputs.guest_files:
        dst = site / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    if not any(rel == AGENT_MODULE.replace(".", "/") + ".py" for rel, _ in inputs.guest_files):
        log(f"warning: {AGENT_MODULE} is not in the source tree yet; the image will not boot an agent")
    entry = tree / ENTRY_PATH
    entry.write_text(ENTRY_SCRIPT.format(python=spec.python, site_dir=spec.site_dir, module=AGENT_MODULE))
    entry.chmod(0o755)
    man = tree / MANIFEST_PATH
    man.parent.mkdir(parents=True, exist_ok=True)
    man.write_text(json.dumps(manifest(inputs), indent=1, sort_keys=True) + "\n")
    log("precompiling guest code and wheels")
    _compile(tree, [site], log)


def build_rootfs(
    out_dir: Path,
    cache_dir: Path,
    spec: RootfsSpec | None = None,
    src_root: Path = SOURCE_ROOT,
    log: Log = print,
    inputs: ResolvedInputs | None = None,
) -> Path:
    """out_dir/kata-containers-<hash>.img, reused when it already exists for the same inputs."""
    inputs = inputs or resolve_inputs(spec or RootfsSpec(), cache_dir, src_root)
    target = out_dir / inputs.image_name
    if target.exists():
        return target
    base = build_base(inputs, cache_dir, log)
    tree = cache_dir / f".rootfs-tree-{inputs.image_hash}.{os.getpid()}"
    _rm(tree)
    try:
        assemble(inputs, base, tree, log)
        log("writing erofs image")
        make_erofs(tree, target, inputs.spec.erofs)
    finally:
        _rm(tree)
    return target
