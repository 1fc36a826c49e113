#!/usr/bin/env python3
"""The demo setup.sh ends with: a busybox container in its own VM shows the guest's kernel, not the host's.

    python scripts/demo.py

It runs the installed ``kata-runtime`` (on PATH, or beside this Python) on a bundle made from the host's
busybox-static by ``tests.support.bundles``, the recipe the tests and benchmarks use (the repository root is
put first on sys.path for it).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.bundles import make_busybox_bundle  # noqa: E402

SCRIPT = (
    'echo "container kernel: $(uname -r)"; '
    'echo "container boot_id: $(cat /proc/sys/kernel/random/boot_id)"; '
    'echo "container CPUs: $(grep -c ^processor /proc/cpuinfo), memory: '
    '$(awk \'/MemTotal/ {print $2 " kB"}\' /proc/meminfo)"'
)


def main() -> int:
    host_boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    print(f"host kernel:       {platform.release()}")
    print(f"host boot_id:      {host_boot_id}")
    runtime = shutil.which("kata-runtime") or f"{sys.prefix}/bin/kata-runtime"
    with tempfile.TemporaryDirectory(prefix="kata-demo-") as tmp:
        bundle = make_busybox_bundle(Path(tmp) / "bundle", ["sh", "-c", SCRIPT])
        cid = f"kata-demo-{uuid.uuid4().hex[:8]}"
        proc = subprocess.run([runtime, "run", "--bundle", str(bundle), cid],
                              capture_output=True, text=True, timeout=300)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        print(f"demo: kata-runtime run exited {proc.returncode}", file=sys.stderr)
        return 1
    if host_boot_id in proc.stdout:
        print("demo: the container saw the host's boot_id: it did not run in a VM", file=sys.stderr)
        return 1
    print("demo: the container ran in its own VM (its kernel and boot_id are not the host's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
