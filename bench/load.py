#!/usr/bin/env python3
"""Load on the host side of the VM boundary, kata against runc in one run, on a private containerd:

- **processes**: one pod (`ctr run -d`), then N processes started in it at once with `ctr task exec`
  (each a client holding its stdio fifos, so the shim relays stdout and stderr and waits on each:
  3 N long-polling calls to the agent); while they all run, the latency of control calls (`ctr task
  ps`, a short `ctr task exec`, `pause`/`resume`). Every call must succeed.
- **pods**: P pods created at once (`ctr run -d`, concurrently), until all run; every one must start.
- **execs**: E short execs (`ctr task exec ... true`) into one pod, C at a time; every one must
  exit 0.

    python bench/load.py [--procs 200] [--pods 20] [--execs 1000] [--concurrency 8] [--json FILE]

Figures are from a noisy 2-core machine under TCG: read them as orders of magnitude. Failures are
counted, never retried; a run with any failure exits 1.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import emit, fmt  # noqa: E402
from bench.shim_vs_runc import RUNTIMES, SHIM_DIR, find_shim  # noqa: E402
from kata.errors import KataError  # noqa: E402
from tests.support.daemons import Containerd, containerd_daemon  # noqa: E402


def ctr_argv(c: Containerd, *args: str) -> list[str]:
    return ["ctr", "-a", str(c.socket), "-n", "default", *args]


def run_all(calls: list[Callable[[], bool]], concurrency: int) -> tuple[int, float]:
    """Run ``calls`` with at most ``concurrency`` at once; (failures, wall seconds)."""
    pending = list(reversed(calls))
    lock = threading.Lock()
    failures = [0]

    def worker() -> None:
        while True:
            with lock:
                if not pending:
                    return
                call = pending.pop()
            ok = False
            try:
                ok = call()
            except Exception:  # noqa: BLE001 - a failure is counted
                ok = False
            if not ok:
                with lock:
                    failures[0] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures[0], time.monotonic() - t0


def timed_ok(argv: list[str], timeout: float) -> tuple[bool, float]:
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, time.monotonic() - t0
    return proc.returncode == 0, time.monotonic() - t0


def processes(c: Containerd, runtime: str, n: int, timeout: float) -> dict[str, Any]:
    pod = f"load-{uuid.uuid4().hex[:10]}"
    ok, _ = timed_ok(ctr_argv(c, "run", "-d", "--runtime", runtime, c.image, pod, "sleep", "100000"),
                     timeout)
    if not ok:
        return {"error": "the pod did not start"}
    clients: list[subprocess.Popen[bytes]] = []
    res: dict[str, Any] = {}
    try:
        t0 = time.monotonic()
        for i in range(n):
            # Each prints a line (its stdout is relayed) and stays until killed.
            clients.append(subprocess.Popen(
                ctr_argv(c, "task", "exec", "--exec-id", f"p{i}", pod, "sh", "-c",
                         "echo up; exec sleep 100000"),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
        started = 0
        for cl in clients:  # each has printed "up" once its process runs in the guest
            assert cl.stdout is not None
            if cl.stdout.readline() == b"up\n":
                started += 1
        res["procs_started"] = started
        res["procs_start_s"] = time.monotonic() - t0
        samples: dict[str, list[float]] = {"ps": [], "exec": [], "pause_resume": []}
        failures = 0
        for i in range(5):
            for key, argvs in (("ps", [ctr_argv(c, "task", "ps", pod)]),
                               ("exec", [ctr_argv(c, "task", "exec", "--exec-id", f"probe{i}", pod, "true")]),
                               ("pause_resume", [ctr_argv(c, "task", "pause", pod),
                                                 ctr_argv(c, "task", "resume", pod)])):
                t = 0.0
                for argv in argvs:
                    ok, dt = timed_ok(argv, timeout)
                    failures += not ok
                    t += dt
                samples[key].append(t)
        res["control_failures"] = failures
        res["control_median_s"] = {k: statistics.median(v) for k, v in samples.items()}
        res["control_max_s"] = {k: max(v) for k, v in samples.items()}
    finally:
        t0 = time.monotonic()
        subprocess.run(ctr_argv(c, "task", "delete", "--force", pod), capture_output=True, timeout=timeout)
        subprocess.run(ctr_argv(c, "container", "delete", pod), capture_output=True, timeout=60)
        for cl in clients:
            try:
                cl.wait(timeout=60)
            except subprocess.TimeoutExpired:
                cl.kill()
                cl.wait()
        res["teardown_s"] = time.monotonic() - t0
    return res


def pods(c: Containerd, runtime: str, n: int, timeout: float) -> dict[str, Any]:
    names = [f"loadpod-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    starts: list[float] = []

    def start(name: str) -> Callable[[], bool]:
        def call() -> bool:
            argv = ctr_argv(c, "run", "-d", "--runtime", runtime, c.image, name, "sleep", "100000")
            ok, dt = timed_ok(argv, timeout)
            starts.append(dt)
            return ok
        return call

    failures, wall = run_all([start(name) for name in names], concurrency=n)
    for name in names:
        subprocess.run(ctr_argv(c, "task", "delete", "--force", name), capture_output=True, timeout=timeout)
        subprocess.run(ctr_argv(c, "container", "delete", name), capture_output=True, timeout=60)
    return {"pods_failures": failures, "pods_wall_s": wall,
            "pod_start_median_s": statistics.median(starts), "pod_start_max_s": max(starts)}


def execs(c: Containerd, runtime: str, n: int, concurrency: int, timeout: float) -> dict[str, Any]:
    pod = f"loadexec-{uuid.uuid4().hex[:10]}"
    ok, _ = timed_ok(ctr_argv(c, "run", "-d", "--runtime", runtime, c.image, pod, "sleep", "100000"), timeout)
    if not ok:
        return {"error": "the pod did not start"}
    try:
        calls = [lambda i=i: timed_ok(ctr_argv(c, "task", "exec", "--exec-id", f"e{i}", pod, "true"),
                                      timeout)[0] for i in range(n)]
        failures, wall = run_all(calls, concurrency)
    finally:
        subprocess.run(ctr_argv(c, "task", "delete", "--force", pod), capture_output=True, timeout=timeout)
        subprocess.run(ctr_argv(c, "container", "delete", pod), capture_output=True, timeout=60)
    return {"exec_failures": failures, "execs_wall_s": wall, "execs_per_s": n / wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--procs", type=int, default=200)
    ap.add_argument("--pods", type=int, default=20)
    ap.add_argument("--execs", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8, help="execs at a time")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for each ctr command")
    ap.add_argument("--only", choices=("kata", "runc"), default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    shim = find_shim(SHIM_DIR)
    results: dict[str, dict[str, Any]] = {}
    try:
        with containerd_daemon() as c:
            for rt, runtime in RUNTIMES.items():
                if (args.only and rt != args.only) or (rt == "kata" and shim is None):
                    continue
                r: dict[str, Any] = {}
                r.update(processes(c, runtime, args.procs, args.timeout))
                r.update(pods(c, runtime, args.pods, args.timeout))
                r.update(execs(c, runtime, args.execs, args.concurrency, args.timeout))
                results[rt] = r
    except KataError as e:
        print(f"load: {e}", file=sys.stderr)
        return 1
    print(f"{args.procs} processes in one pod, {args.pods} pods at once, {args.execs} execs "
          f"({args.concurrency} at a time)")
    print(f"{'':40s} {'runc':>9s} {'kata':>9s}")
    runc, kata = results.get("runc", {}), results.get("kata", {})
    rows = [("processes started", "procs_started", "9.0f"),
            ("  all started after (s)", "procs_start_s", "9.2f"),
            ("  control call failures", "control_failures", "9.0f"),
            ("pods failed to start", "pods_failures", "9.0f"),
            ("  all pods running after (s)", "pods_wall_s", "9.2f"),
            ("execs failed", "exec_failures", "9.0f"), ("  execs per second", "execs_per_s", "9.2f")]
    for label, key, spec in rows:
        print(f"{label:40s} {fmt(runc.get(key), spec)} {fmt(kata.get(key), spec)}")
    for key in ("ps", "exec", "pause_resume"):
        label = f"  {key} under load, median/max (s)"
        cells = [f"{r['control_median_s'][key]:.2f}/{r['control_max_s'][key]:.2f}" if "control_median_s" in r
                 else "-" for r in (runc, kata)]
        print(f"{label:40s} {cells[0]:>9s} {cells[1]:>9s}")
    emit({"bench": "load", "procs": args.procs, "pods": args.pods, "execs": args.execs, **results}, args.json)
    counts = ("control_failures", "pods_failures", "exec_failures")
    failed = any(r.get(k) for r in results.values() for k in counts)
    failed |= any("error" in r or r.get("procs_started", args.procs) < args.procs for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
