#!/usr/bin/env python3
"""containerd's kata shim v2 (`containerd-shim-kata-v2`) against its runc shim, in one run, on a private
containerd (tests.support.daemons) with the locally built busybox image:

- `ctr run --rm IMAGE ID true` with `--runtime io.containerd.kata.v2` and `io.containerd.runc.v2`:
  wall time, median of N (one untimed run first: kata's first sandbox makes its VM template);
- for one idle detached task (`ctr run -d --null-io IMAGE ID sleep ...`), after it settles, the PSS
  (/proc/PID/smaps_rollup) of the task's host processes, by kind: the shim process(es), and for kata
  QEMU and virtiofsd. A pod's footprint as Kata measures it is qemu + virtiofsd + shim; runc's is
  its shim plus the container's own process.

    python bench/shim_vs_runc.py [--runs N] [--settle S] [--json FILE] [--kata-config FILE] [--pool N]

With --pool N (2 by default; 0 leaves it out) kata is measured once more as "kata-pool", its sandboxes
taking warm VMs from a pool of N (vm_cache_number), full again before every timed run.

containerd finds `containerd-shim-kata-v2` on its PATH; /opt/kata-containers/venv/bin is added to it.
Without the shim, kata is reported as not installed and runc is still measured (exit status 0); a
runtime that fails is reported with its error and makes the exit status 1. Figures are medians from a
noisy machine: read them as orders of magnitude.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypedDict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import (  # noqa: E402
    RuntimeFailed,
    checked,
    emit,
    fmt,
    pool_config,
    processes,
    pss_kib,
    ratio,
    timed,
    warm_pool,
    with_descendants,
)
from kata.errors import KataError  # noqa: E402
from kata.sandbox.paths import VIRTIOFSD_SOCKET, VM_ROOT  # noqa: E402
from tests.support.daemons import Containerd, containerd_daemon  # noqa: E402

RUNTIMES = {"runc": "io.containerd.runc.v2", "kata": "io.containerd.kata.v2"}
KATA_SHIM = "containerd-shim-kata-v2"
SHIM_DIR = "/opt/kata-containers/venv/bin"  # where scripts/install.sh puts the project's commands
# the shim issue's targets on this machine under TCG
TARGET_RUN_RATIO = 10.0
TARGET_SHIM_MB = 40.0
TARGET_POD_MB = 150.0
TARGET_POOL_RATIO = 6.0
KINDS = ("shim", "qemu", "virtiofsd", "other")


def find_shim(shim_dir: str) -> str | None:
    """The kata shim containerd will run; its directory is put on our PATH (containerd inherits it)."""
    found = shutil.which(KATA_SHIM) or shutil.which(KATA_SHIM, path=shim_dir)
    if found and os.path.dirname(found) not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.path.dirname(found) + os.pathsep + os.environ.get("PATH", "")
    return found


def kind(argv: list[str], address: str) -> str:
    # A shim is known by the containerd address it was given: the kata shim is a Python program
    # (`python3 .../containerd-shim-kata-v2 -namespace NS -address SOCK ...`), not named for its binary.
    names = [os.path.basename(a) for a in argv[:2]]
    if address in argv or any(n.startswith("containerd-shim") for n in names):
        return "shim"
    if names[0].startswith("qemu-system"):
        return "qemu"
    if names[0].startswith("virtiofsd"):
        return "virtiofsd"
    return "other"  # runc's container process; anything else the kata shim starts


def task_processes(c: Containerd, cid: str) -> dict[int, list[str]]:
    """The host processes of task ``cid``: those naming it with our containerd's shims among them (QEMU and
    virtiofsd name the sandbox in their arguments), and their descendants."""
    table = processes()
    address = str(c.socket)
    roots = {pid for pid, (_, argv) in table.items()
             if any(cid in a for a in argv) and kind(argv, address) != "other"
             and (kind(argv, address) != "shim" or address in argv)}
    # A VM from the warm pool: its QEMU and virtiofsd name their pool slot, not the sandbox; the pid
    # files in the sandbox's VM directory have them.
    for pid_file in ("qemu.pid", f"{VIRTIOFSD_SOCKET}.pid"):
        try:
            roots.add(int((VM_ROOT / cid / pid_file).read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            pass
    return {pid: table[pid][1] for pid in with_descendants(roots, table) if pid in table}


class Proc(TypedDict):
    pid: int
    kind: str
    argv: list[str]
    pss_kib: int | None


def footprint(c: Containerd, cid: str) -> dict[str, Any]:
    procs = [Proc(pid=pid, kind=kind(argv, str(c.socket)), argv=argv[:4], pss_kib=pss_kib(pid))
             for pid, argv in sorted(task_processes(c, cid).items())]
    by_kind = {k: sum(p["pss_kib"] or 0 for p in procs if p["kind"] == k) for k in KINDS}
    return {"processes": procs, "pss_kib": by_kind, "pss_total_kib": sum(by_kind.values())}


def bench_runtime(c: Containerd, runtime_type: str, extra: list[str], runs: int, settle: float,
                  timeout: float, before_each: Callable[[], None] = lambda: None) -> dict[str, Any]:
    def run_true() -> float:
        before_each()
        return timed(c.ctr, "run", "--rm", "--runtime", runtime_type, *extra, c.image,
                     f"bench-{uuid.uuid4().hex[:12]}", "true", timeout=timeout)

    res: dict[str, Any] = {"warmup_s": run_true()}
    res["run_s"] = [run_true() for _ in range(runs)]
    res["run_median_s"] = statistics.median(res["run_s"])
    cid = f"bench-idle-{uuid.uuid4().hex[:12]}"
    before_each()
    checked(c.ctr, "run", "-d", "--null-io", "--runtime", runtime_type, *extra, c.image, cid,
            "sleep", "100000", timeout=timeout)
    try:
        time.sleep(settle)  # let the VM's boot-time pages settle before sampling
        res.update(footprint(c, cid))
    finally:
        c.ctr("tasks", "delete", "--force", cid, timeout=timeout)
        c.ctr("containers", "delete", cid, timeout=60)
    return res


def find_kata_runtime(shim: str) -> str:
    return shutil.which("kata-runtime") or str(Path(shim).with_name("kata-runtime"))


def bench_pool(c: Containerd, args: argparse.Namespace, kata: str) -> dict[str, Any]:
    """kata once more, its sandboxes taking warm VMs from a pool of ``args.pool``."""
    with tempfile.TemporaryDirectory(prefix="kata-bench-pool-") as tmp:
        base = Path(args.kata_config) if args.kata_config else None
        conf = pool_config(Path(tmp) / "pool.toml", args.pool, base)
        try:
            with warm_pool(kata, conf) as refilled:
                return bench_runtime(c, RUNTIMES["kata"], ["--runtime-config-path", str(conf)], args.runs,
                                     args.settle, args.timeout, refilled)
        except RuntimeFailed as e:
            return {"error": str(e)}


def mb(r: Mapping[str, Any], *kinds: str) -> float | None:
    if "pss_kib" not in r:
        return None
    return float(sum(r["pss_kib"][k] for k in kinds)) / 1024


def report(results: dict[str, dict[str, Any]], runs: int) -> dict[str, float | None]:
    runc, kata = results["runc"], results["kata"]
    ratios = {"run": ratio(results, "run_median_s")}
    print(f"medians of {runs} runs; PSS of an idle detached task's host processes")
    print(f"{'':34s} {'runc':>9s} {'kata':>9s} {'kata/runc':>10s}  target")
    print(f"{'ctr run --rm true (s)':34s} {fmt(runc.get('run_median_s'), '9.3f')} "
          f"{fmt(kata.get('run_median_s'), '9.3f')} {fmt(ratios['run'], '9.1f', 'x')}  "
          f"<= {TARGET_RUN_RATIO:g}x")
    if "kata-pool" in results:
        ratios["run_pool"] = ratio(results, "run_median_s", "kata-pool")
        pooled = fmt(results["kata-pool"].get("run_median_s"), "9.3f")
        print(f"{'  with the warm VM pool (s)':34s} {'':9s} {pooled} {fmt(ratios['run_pool'], '9.1f', 'x')}  "
              f"<= {TARGET_POOL_RATIO:g}x (issue 11)")
    rows = [("shim PSS (MB)", ("shim",), f"kata < {TARGET_SHIM_MB:g} MB"),
            ("qemu PSS (MB)", ("qemu",), ""), ("virtiofsd PSS (MB)", ("virtiofsd",), ""),
            ("pod: qemu + virtiofsd + shim (MB)", ("qemu", "virtiofsd", "shim"),
             f"kata < {TARGET_POD_MB:g} MB"),
            ("other processes (MB)", ("other",), "runc: the container's")]
    for label, kinds, target in rows:
        cells = f"{fmt(mb(runc, *kinds), '9.2f')} {fmt(mb(kata, *kinds), '9.2f')}"
        print(f"{label:34s} {cells} {'':10s}  {target}")
    print(f"{'runc: shim + container (MB)':34s} {fmt(mb(runc, 'shim', 'other'), '9.2f')}")
    pod = mb(kata, "qemu", "virtiofsd", "shim")
    if pod:  # what deploy/kubernetes/runtimeclass.yaml's overhead is meant to hold
        print(f"kata RuntimeClass overhead.podFixed.memory from this run: {math.ceil(pod)}Mi")
    for rt, r in results.items():
        if "error" in r or "skipped" in r:
            print(f"{rt}: {'FAILED: ' + r['error'] if 'error' in r else r['skipped']}")
        else:
            procs = ", ".join(f"{p['kind']} {p['pid']} {(p['pss_kib'] or 0) / 1024:.1f}"
                              for p in r["processes"])
            print(f"{rt}: first run {r['warmup_s']:.3f} s; processes (MB): {procs or 'none found'}")
    return ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds an idle task runs before its PSS is read")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    ap.add_argument("--shim-dir", default=SHIM_DIR, help=f"where to look for {KATA_SHIM} beyond PATH")
    ap.add_argument("--kata-config", default=None,
                    help="configuration.toml for the kata shim (ctr's --runtime-config-path, "
                    "as CRI's ConfigPath)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds for each ctr command")
    ap.add_argument("--pool", type=int, default=2, help="warm VMs for the kata-pool run (0: none)")
    args = ap.parse_args()

    shim = find_shim(args.shim_dir)
    results: dict[str, dict[str, Any]] = {}
    if shim is None:
        results["kata"] = {"skipped": f"{KATA_SHIM} not installed (not on PATH nor in {args.shim_dir})"}
    extra = {"runc": [], "kata": ["--runtime-config-path", args.kata_config] if args.kata_config else []}
    t0 = time.monotonic()
    try:
        with containerd_daemon() as c:
            startup = time.monotonic() - t0
            for rt, runtime_type in RUNTIMES.items():
                if rt in results:
                    continue
                try:
                    results[rt] = bench_runtime(c, runtime_type, extra[rt], args.runs, args.settle,
                                                args.timeout)
                except RuntimeFailed as e:
                    results[rt] = {"error": str(e)}
            if args.pool > 0 and shim is not None:
                results["kata-pool"] = bench_pool(c, args, find_kata_runtime(shim))
    except KataError as e:
        print(f"shim_vs_runc: {e}", file=sys.stderr)
        return 1
    print(f"containerd started and the image imported in {startup:.2f} s; kata shim: {shim or 'none'}")
    ratios = report(results, args.runs)
    out = {"bench": "shim_vs_runc", "runs": args.runs, "settle_s": args.settle, "kata_shim": shim,
           "daemon_start_s": round(startup, 3), "ratios": ratios, **results}
    emit(out, args.json)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
