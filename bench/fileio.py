#!/usr/bin/env python3
"""File IO from a container through a bind volume, kata with each shared filesystem against runc,
in one run on a private containerd (`ctr run --rm --mount type=bind,...`), timed inside the
container by busybox's `time`:

- sequential write of a --size-mib file (`dd ... conv=fsync`);
- sequential read of a --size-mib file the host wrote before the container started (so the guest's
  page cache is cold and the bytes come through the share; the host's cache is warm for both), in
  1 MiB reads ("read"), and of another such file in busybox dd's default 512-byte reads ("read512",
  what a program reading in small pieces sees: one system call per 512 bytes);
- --files small files created one by one, then listed with their attributes (`ls -l`).

    python bench/fileio.py [--size-mib 256] [--files 2000] [--runs 3] [--json FILE]

kata runs twice: with the default configuration (virtio-fs) and with shared_fs = "virtio-9p"
(a copy of the default configuration). Medians of --runs; read the kata/runc ratios.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import RuntimeFailed, checked, emit, fmt  # noqa: E402
from kata.config.load import find_config  # noqa: E402
from kata.errors import KataError  # noqa: E402
from tests.support.daemons import Containerd, containerd_daemon  # noqa: E402

STEPS = ("write", "read", "read512", "files")
_REAL = re.compile(r"real\s+(?:(\d+)m\s*)?([\d.]+)s")


def script(size_mib: int, files: int) -> str:
    # One stream, in order: busybox's `time` is a program, writing to its stderr after the step.
    return (f"exec 2>&1; cd /v && "
            f"time sh -c 'dd if=/dev/zero of=w bs=1M count={size_mib} conv=fsync 2>/dev/null'; echo =write; "
            f"time sh -c 'dd if=r of=/dev/null bs=1M 2>/dev/null'; echo =read; "
            f"time sh -c 'dd if=r2 of=/dev/null 2>/dev/null'; echo =read512; "
            f"mkdir d && time sh -c 'i=0; while [ $i -lt {files} ]; do echo x > d/f$i; i=$((i+1)); done; "
            f"ls -l d > /dev/null'; echo =files")


def parse(output: str) -> dict[str, float]:
    """busybox's `time` lines ("real 0m 1.23s"), each followed by the step's marker."""
    found: dict[str, float] = {}
    seconds: float | None = None
    for line in output.splitlines():
        m = _REAL.search(line)
        if m:
            seconds = int(m.group(1) or 0) * 60 + float(m.group(2))
        elif line.startswith("=") and seconds is not None:
            found[line[1:].strip()] = seconds
            seconds = None
    return found


def one_run(c: Containerd, runtime: list[str], size_mib: int, files: int, timeout: float) -> dict[str, float]:
    volume = Path(tempfile.mkdtemp(prefix="kata-fileio-"))
    try:
        for name in ("r", "r2"):  # the files the container reads, written by the host
            with open(volume / name, "wb") as f:
                block = b"\xa5" * (1 << 20)
                for _ in range(size_mib):
                    f.write(block)
        proc = checked(c.ctr, "run", "--rm", *runtime, "--mount",
                       f"type=bind,src={volume},dst=/v,options=rbind:rw", c.image,
                       f"fio-{uuid.uuid4().hex[:10]}", "sh", "-c", script(size_mib, files), timeout=timeout)
        found = parse(proc.stdout + proc.stderr)
        if set(found) != set(STEPS):
            raise RuntimeFailed(f"could not read the timings: {(proc.stdout + proc.stderr)[-300:]!r}")
        return found
    finally:
        shutil.rmtree(volume, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kata-fileio-conf-"))
    nine_p = work / "configuration-9p.toml"
    text = find_config().read_text()
    nine_p.write_text(re.sub(r'(?m)^shared_fs\s*=.*$', 'shared_fs = "virtio-9p"', text))
    modes = {
        "runc": ["--runtime", "io.containerd.runc.v2"],
        "kata virtio-fs": ["--runtime", "io.containerd.kata.v2"],
        "kata 9p": ["--runtime", "io.containerd.kata.v2", "--runtime-config-path", str(nine_p)],
    }
    results: dict[str, dict[str, Any]] = {}
    try:
        with containerd_daemon() as c:
            for mode, runtime in modes.items():
                try:
                    runs = [one_run(c, runtime, args.size_mib, args.files, args.timeout)
                            for _ in range(args.runs)]
                except RuntimeFailed as e:
                    results[mode] = {"error": str(e)}
                    continue
                results[mode] = {step: statistics.median(r[step] for r in runs) for step in STEPS}
                results[mode]["runs"] = runs
    except KataError as e:
        print(f"fileio: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)

    size = args.size_mib
    runc = results.get("runc", {})
    print(f"medians of {args.runs} runs; {size} MiB sequential, {args.files} small files; MB/s and s")
    print(f"{'':16s} {'write MB/s':>10s} {'read MB/s':>10s} {'512 B reads':>11s} {'files s':>8s}   "
          "ratios to runc (write, read, 512 B reads, files)")
    for mode, r in results.items():
        if "error" in r:
            print(f"{mode:16s} FAILED: {r['error']}")
            continue
        w, rd, small = (size * 1.048576 / r[step] for step in ("write", "read", "read512"))
        ratios = ""
        if mode != "runc" and "write" in runc:
            ratios = (f"{runc['write'] / r['write']:.2f} {runc['read'] / r['read']:.2f} "
                      f"{runc['read512'] / r['read512']:.2f} {r['files'] / runc['files']:.1f}x slower")
        cells = f"{fmt(w, '10.0f')} {fmt(rd, '10.0f')} {fmt(small, '11.0f')} {fmt(r['files'], '8.2f')}"
        print(f"{mode:16s} {cells}   {ratios}")
    emit({"bench": "fileio", "size_mib": size, "files": args.files, "runs": args.runs, **results}, args.json)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
