"""Small OCI bundles made from the host's busybox-static: for the demo, the tests and the benchmarks.

No registry is needed: the rootfs is one static binary plus its applet links.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from kata.oci.default_spec import default_spec

BUSYBOX = "/bin/busybox"

def make_rootfs(rootfs: Path) -> None:
    """busybox-static and a link for each of its applets under /bin."""
    bindir = rootfs / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, bindir / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True, text=True).stdout.split()
    for applet in applets:
        link = bindir / applet
        if applet != "busybox" and not link.exists():
            os.symlink("busybox", link)
    for d in ("proc", "sys", "dev", "etc", "tmp", "root"):
        (rootfs / d).mkdir(exist_ok=True)
    passwd = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
    (rootfs / "etc" / "passwd").write_text(passwd)
    (rootfs / "etc" / "group").write_text("root:x:0:\nnobody:x:65534:\n")


def make_busybox_bundle(bundle: Path, args: list[str], terminal: bool = False,
                        spec_changes: dict[str, Any] | None = None) -> Path:
    bundle.mkdir(parents=True, exist_ok=True)
    make_rootfs(bundle / "rootfs")
    spec = default_spec(args, terminal)
    for key, value in (spec_changes or {}).items():
        spec[key] = value
    (bundle / "config.json").write_text(json.dumps(spec, indent=1))
    return bundle
