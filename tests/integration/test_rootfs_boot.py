"""Boot the guest root image under QEMU and measure, inside the guest, what the agent's start-up costs.

The measuring program is passed on the kernel command line (init=python3.11 -- -S -c exec(...)), so the
image under test is exactly the one the runtime boots. Times are printed as `KATA-MEASURE name value`.
"""

from __future__ import annotations

import base64
import os
import select
import shutil
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from kata.hypervisor.host import tcg_kernel_params
from kata.osbuilder.image import ErofsOptions
from kata.osbuilder.rootfs import RootfsSpec, build_rootfs
from kata.sandbox.vm import GUEST_KERNEL_PARAMS as KERNEL_PARAMS

QEMU = Path("/usr/bin/qemu-system-x86_64")
KERNEL = Path("/usr/share/kata-containers/vmlinux.container")
CACHE = Path(os.environ.get("KATA_OSBUILDER_CACHE", "/var/cache/kata-containers/osbuilder"))
BOOT_TIMEOUT = 150.0

pytestmark = [
    pytest.mark.vm,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not KERNEL.exists(), reason=f"guest kernel {KERNEL} not built yet"),
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mkfs.erofs") is None, reason="needs root + erofs"),
]

# Runs as PID 1. Each case is a fresh interpreter (what the agent's start pays); it prints the in-process
# import time, the parent measures the whole process. Medians of 3.
GUEST = r"""
import os, sys, time, subprocess, ctypes
S = '/usr/lib/kata-agent'
def out(*a): os.write(1, ('KATA-MEASURE ' + ' '.join(map(str, a)) + '\n').encode())
subprocess.run(['/bin/busybox', 'mount', '-t', 'proc', 'proc', '/proc'])
out('uptime_at_init', open('/proc/uptime').read().split()[0])
mods = lambda d, p: [p + f[:-3] for f in sorted(os.listdir(S + '/' + d)) if f.endswith('.py') and f[0] != '_']
pb2 = [m for m in mods('kata/protocols', 'kata.protocols.') if m.endswith('_pb2')]
ttrpc = ['kata.ttrpc'] + mods('kata/ttrpc', 'kata.ttrpc.')
agent = mods('kata/guest/agent', 'kata.guest.agent.')
std = 'json,socket,threading,ctypes,struct,signal,select,fcntl,termios,pty,subprocess'
cases = {'pass': '', 'stdlib': std, 'asyncio': 'asyncio', 'protobuf': 'google.protobuf.message',
         'pb2': ','.join(pb2), 'ttrpc': ','.join(ttrpc), 'agent_all': ','.join([std] + ttrpc + pb2 + agent)}
for name, m in cases.items():
    code = "import sys,time;sys.path.insert(0,%r);t=time.perf_counter();%s;print(time.perf_counter()-t)" % (
        S, ('import ' + m) if m else 'pass')
    walls, imps = [], []
    for _ in range(3):
        t = time.perf_counter()
        r = subprocess.run(['/usr/bin/python3.11', '-IS', '-c', code], capture_output=True, text=True)
        walls.append(time.perf_counter() - t)
        if r.returncode:
            out('error', name, r.stderr.strip().splitlines()[-1:]); break
        imps.append(float(r.stdout))
    else:
        out(name, 'process=%.3f' % sorted(walls)[1], 'import=%.3f' % sorted(imps)[1])
r = subprocess.run(['/usr/bin/python3.11', '-IS', '-c', "import sys;sys.path.insert(0,%r);"
                    "from google.protobuf.internal import api_implementation as a;print(a.Type())" % S],
                   capture_output=True, text=True)
out('protobuf_impl', r.stdout.strip() or r.stderr.strip()[-80:])
out('done')
ctypes.CDLL(None).reboot(0x4321FEDC)
"""


def guest_cmdline(program: str) -> str:
    packed = base64.b64encode(zlib.compress(program.encode(), 9)).decode()
    code = f"exec(__import__('zlib').decompress(__import__('base64').b64decode('{packed}')))"
    params = [
        *KERNEL_PARAMS,
        *tcg_kernel_params(),
        "root=/dev/vda",
        "rootfstype=erofs",
        "ro",
        "init=/usr/bin/python3.11",
    ]
    return " ".join([*params, "--", "-S", "-c", code])


def boot_and_measure(image: Path, timeout: float = BOOT_TIMEOUT) -> dict[str, str]:
    """Boot image with the measuring init; returns {name: rest of line}. QEMU is always killed."""
    cmd = [
        str(QEMU), "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on", "-accel", "tcg",
        "-m", "512", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
        "-drive", f"file={image},if=none,id=root,format=raw,readonly=on",
        "-device", "virtio-blk-device,drive=root",
        "-kernel", str(KERNEL), "-append", guest_cmdline(GUEST),
    ]  # fmt: skip
    assert len(cmd[-1]) < 2048, "kernel command line too long"
    results: dict[str, str] = {}
    console: list[str] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    buf = b""
    try:
        while "done" not in results:
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                raise AssertionError("guest timed out; console:\n" + "\n".join(console[-30:]))
            ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError("QEMU exited early; console:\n" + "\n".join(console[-30:]))
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").strip()
                console.append(line)
                if line.startswith("KATA-MEASURE "):
                    name, _, rest = line[len("KATA-MEASURE ") :].partition(" ")
                    results[name] = rest
        results["host_wall"] = f"{time.monotonic() - t0:.2f}"
    finally:
        proc.kill()
        proc.wait(timeout=10)
    return results


@pytest.mark.parametrize("compression", [None, "lz4hc"])
def test_boot_image_and_measure_python_start(compression: str | None, tmp_path: Path) -> None:
    spec = RootfsSpec(erofs=ErofsOptions(compression=compression))
    image = build_rootfs(tmp_path, CACHE, spec, log=lambda _m: None)
    res = boot_and_measure(image)
    print(f"\n[{compression or 'uncompressed'}] {image.stat().st_size / 2**20:.1f} MiB", res)
    assert "error" not in res, res
    assert res["protobuf_impl"] == "upb"
    for name in ("pass", "stdlib", "protobuf", "pb2", "ttrpc", "agent_all"):
        assert name in res, name
