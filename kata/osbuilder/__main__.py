"""kata-osbuilder: build (or reuse) the guest kernel and root image and install them for the runtime."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from kata.osbuilder import kernel
from kata.osbuilder.debian import PackageError
from kata.osbuilder.image import ErofsOptions, ImageError
from kata.osbuilder.install import (
    IMAGE_LINK,
    KERNEL_LINK,
    built_names,
    installed_target,
    link_atomically,
    prune_others,
)
from kata.osbuilder.progress import Progress
from kata.osbuilder.rootfs import RootfsError, RootfsSpec, build_rootfs, resolve_inputs
from kata.osbuilder.wheel import WheelError

DEFAULT_OUTPUT = Path("/usr/share/kata-containers")
DEFAULT_CACHE = Path("/var/cache/kata-containers/osbuilder")
# Exit status of `status` when an asset is missing or older than its inputs (1 stays "error").
EXIT_STALE = 3

_ERRORS = (
    kernel.KernelBuildError, RootfsError, PackageError, WheelError, ImageError, OSError,
    subprocess.CalledProcessError,
)  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kata-osbuilder", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("build", "build or reuse the guest assets"),
        ("status", "show installed assets"),
    ):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
        s.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    b = sub.choices["build"]
    b.add_argument("--jobs", "-j", type=int, default=None, help="parallel kernel compile jobs")
    only = b.add_mutually_exclusive_group()
    only.add_argument("--kernel-only", action="store_true")
    only.add_argument("--rootfs-only", action="store_true")
    b.add_argument(
        "--compression", choices=("none", "lz4", "lz4hc"), default="none", help="erofs compression"
    )
    return p


def _spec(args: argparse.Namespace) -> RootfsSpec:
    comp = getattr(args, "compression", "none")
    return RootfsSpec(erofs=ErofsOptions(compression=None if comp == "none" else comp))


def build(args: argparse.Namespace) -> int:
    out: Path = args.output_dir
    cache: Path = args.cache_dir
    progress = Progress()
    out.mkdir(parents=True, exist_ok=True)
    old: list[str] = []
    if not args.rootfs_only:
        with progress.step("kernel"):
            vmlinux = kernel.build_kernel(out, cache, jobs=args.jobs, log=progress.log)
            link_atomically(out / KERNEL_LINK, vmlinux)
        progress.note(f"kernel: {out / KERNEL_LINK} -> {vmlinux.name}")
        # Older kernels, and their build trees (1.6 GB each); the current tree stays for the next
        # incremental build.
        old += prune_others(vmlinux, built_names("vmlinux-"))
        old += prune_others(cache / f"linux-{vmlinux.name.removeprefix('vmlinux-')}", built_names("linux-"))
    if not args.kernel_only:
        with progress.step("resolve rootfs inputs"):
            inputs = resolve_inputs(_spec(args), cache)
        progress.note(f"rootfs: {len(inputs.packages)} packages, image {inputs.image_name}")
        with progress.step("rootfs image"):
            image = build_rootfs(out, cache, log=progress.log, inputs=inputs)
            link_atomically(out / IMAGE_LINK, image)
        size = image.stat().st_size / 2**20
        progress.note(f"rootfs: {out / IMAGE_LINK} -> {image.name} ({size:.1f} MiB)")
        old += prune_others(image, built_names("kata-containers-", ".img"))
        old += prune_others(cache / f"rootfs-base-{inputs.base_hash}", built_names("rootfs-base-"))
    if old:
        progress.note(f"removed older builds: {', '.join(sorted(old))}")
    return 0


def status(args: argparse.Namespace) -> int:
    out: Path = args.output_dir
    rows: list[tuple[str, Path | None, str]] = [
        (KERNEL_LINK, installed_target(out / KERNEL_LINK), f"vmlinux-{kernel.kernel_inputs_hash()}"),
        (
            IMAGE_LINK,
            installed_target(out / IMAGE_LINK),
            resolve_inputs(_spec(args), args.cache_dir).image_name,
        ),
    ]
    stale = False
    for link, target, wanted in rows:
        if target is None:
            state, stale = "missing", True
        elif target.name == wanted:
            state = "up to date"
        else:
            state, stale = f"stale (inputs now give {wanted})", True
        print(f"{link:20} {target.name if target else '-':40} {state}")
    return EXIT_STALE if stale else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return build(args) if args.command == "build" else status(args)
    except _ERRORS as exc:
        print(f"kata-osbuilder: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kata-osbuilder: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
