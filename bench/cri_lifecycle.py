#!/usr/bin/env python3
"""Pod lifecycle latency through containerd's CRI, as critest's benchmarks measure it, with the runtime
handlers runc and kata in one run: a private containerd with its CRI plugin (tests.support.daemons, in a
network namespace of its own, pods on its CNI bridge) driven by the project's CRI client.

Each cycle, timed call by call: RunPodSandbox, CreateContainer (busybox `sleep`, its log under the pod's
log directory, as kubelet asks), StartContainer, ExecSync of `true`, StopContainer (grace 0: SIGKILL at
once, as `sleep` as PID 1 ignores SIGTERM), StopPodSandbox, RemovePodSandbox. "cycle" is the sum of the
lifecycle calls, ExecSync left out. The handlers take turns, cycle by cycle, so that the machine's load
falls on both alike. The first cycle of each handler is reported apart and not counted (cold: kata's
first sandbox may make its VM template, the image is first unpacked for each snapshot).

    python bench/cri_lifecycle.py [--iterations N] [--kata-config FILE] [--pool N] [--timeout S] [--json FILE]

With ``--pool N`` (N > 0) a third handler, kata-pool, runs with the same configuration plus a warm VM
pool of N clones (`kata-runtime factory init`), full again after each of its cycles (untimed, before
the next handler's cycle, so that the refill does not load another handler's).

A handler that fails is reported with its error and the other is still measured; the exit status is
then 1. Figures are from a noisy 2-core machine: read them as orders of magnitude, and as ratios to
runc's within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import RuntimeFailed, emit, fmt, pool_config, ratio, warm_pool  # noqa: E402
from kata.errors import KataError  # noqa: E402
from tests.support.cri import CriClient, CriError, pod_config  # noqa: E402
from tests.support.cri_config import KATA  # noqa: E402
from tests.support.daemons import (  # noqa: E402
    Containerd,
    containerd_daemon,
    cri_missing_tools,
    kata_runtime_path,
)
from tests.support.netns import temporary_netns  # noqa: E402

T = TypeVar("T")
HANDLERS = ("runc", "kata")
LIFECYCLE = ("RunPodSandbox", "CreateContainer", "StartContainer", "StopContainer", "StopPodSandbox",
             "RemovePodSandbox")
PHASES = (*LIFECYCLE[:3], "ExecSync", *LIFECYCLE[3:], "cycle")
SLEEPER = ["sleep", "1000000"]


class Interrupts:
    """Ctrl-C and SIGTERM wait for the CRI call in flight and stop the run before the next one. A pod whose
    RunPodSandbox is cut short is known to nobody (containerd lists it once it is ready), and killing its
    shim in that state leaves the VM's state on the host. A second signal stops at once."""

    pending = False

    @classmethod
    def handle(cls, signum: int, frame: FrameType | None) -> None:
        if cls.pending:
            raise KeyboardInterrupt
        cls.pending = True
        print("cri_lifecycle: stopping after the call in flight (again: at once)", file=sys.stderr,
              flush=True)

    @classmethod
    def check(cls) -> None:
        if cls.pending:
            raise KeyboardInterrupt


def lifecycle(cri: CriClient, c: Containerd, handler: str, n: int) -> dict[str, float]:
    """One pod's life, each CRI call's wall time by phase; RuntimeFailed on a failed call (the pod is
    then removed)."""
    times: dict[str, float] = {}

    def step(phase: str, call: Callable[[], T]) -> T:
        Interrupts.check()
        t0 = time.monotonic()
        result = call()
        times[phase] = time.monotonic() - t0
        return result

    name, uid = f"bench-{handler}-{n}", uuid.uuid4().hex[:12]
    config = pod_config(name, "default", uid, cgroup_parent=c.cgroup_parent,
                        log_directory=str(c.base / "pod-logs" / f"default_{name}_{uid}"))
    pod = ""
    try:
        pod = step("RunPodSandbox", lambda: cri.run_pod_sandbox(config, handler))
        cid = step("CreateContainer", lambda: cri.create_container(pod, config, "sleeper", c.image, SLEEPER,
                                                                   log_path="sleeper.log"))
        step("StartContainer", lambda: cri.start_container(cid))
        result = step("ExecSync", lambda: cri.exec_sync(cid, ["true"]))
        if result.exit_code != 0:
            raise RuntimeFailed(f"ExecSync of true exited {result.exit_code}: {result.stderr.strip()[:200]}")
        step("StopContainer", lambda: cri.stop_container(cid, grace=0))
        step("StopPodSandbox", lambda: cri.stop_pod_sandbox(pod))
        step("RemovePodSandbox", lambda: cri.remove_pod_sandbox(pod))
        pod = ""
    except CriError as e:
        raise RuntimeFailed(str(e)) from e
    finally:
        if pod:  # what failed (or was stopped) goes now; containerd's stop removes what this cannot
            with contextlib.suppress(CriError):
                cri.remove_pod(pod)
    times["cycle"] = sum(times[p] for p in LIFECYCLE)
    return times


def summary(cycles: list[dict[str, float]]) -> dict[str, Any]:
    runs = {p: [cy[p] for cy in cycles] for p in PHASES}
    return {"median_s": {p: statistics.median(v) for p, v in runs.items()},
            "min_s": {p: min(v) for p, v in runs.items()}, "max_s": {p: max(v) for p, v in runs.items()},
            "runs_s": {p: [round(x, 4) for x in v] for p, v in runs.items()}}


def measure(cri: CriClient, c: Containerd, iterations: int, handlers: tuple[str, ...] = HANDLERS,
            after: dict[str, Callable[[], None]] | None = None) -> dict[str, dict[str, Any]]:
    """A first cycle of each handler, then ``iterations`` rounds of one cycle each, handlers in turn.
    ``after``: what to wait for, untimed, after a handler's cycle (its pool full again)."""
    results: dict[str, dict[str, Any]] = {}
    cycles: dict[str, list[dict[str, float]]] = {h: [] for h in handlers}
    for n in range(iterations + 1):
        for handler in handlers:
            if "error" in results.get(handler, {}):
                continue
            try:
                times = lifecycle(cri, c, handler, n)
                if after and handler in after:
                    after[handler]()
            except RuntimeFailed as e:
                results[handler] = {"error": f"cycle {n}: {e}"}
                continue
            if n == 0:
                results[handler] = {"first_s": times}
            else:
                cycles[handler].append(times)
        print(f"... round {n}{' (first, not counted)' if n == 0 else ''} done", flush=True)
    for handler in handlers:
        if "error" not in results[handler]:
            results[handler].update(summary(cycles[handler]))
    return results


def report(results: dict[str, dict[str, Any]], iterations: int) -> dict[str, dict[str, float | None]]:
    """The table; the ratios to runc of each other handler, phase by phase."""
    handlers = list(results)
    medians = {h: r["median_s"] for h, r in results.items() if "median_s" in r}
    ratios = {h: {p: ratio(medians, p, h) for p in PHASES} for h in handlers if h != "runc"}
    print(f"seconds; median (min-max) of {iterations} cycles per handler; the first cycle apart, not counted")
    print(f"{'':17s} " + " ".join(f"{h:>21s}" for h in handlers)
          + "".join(f" {h + '/runc':>14s}" for h in ratios)
          + "  first: " + " ".join(f"{h:>9s}" for h in handlers))
    for p in PHASES:
        cells = []
        for h in handlers:
            r = results[h]
            spread = (f"({r['min_s'][p]:.3f}-{r['max_s'][p]:.3f})" if "min_s" in r else "").rjust(13)
            cells.append(f"{fmt(r.get('median_s', {}).get(p), '7.3f')} {spread}")
        shares = "".join(f" {fmt(ratios[h][p], '13.1f', 'x')}" for h in ratios)
        firsts = " ".join(f"{fmt(results[h].get('first_s', {}).get(p), '9.3f')}" for h in handlers)
        print(f"{p:17s} {' '.join(cells)}{shares}  first: {firsts}")
    for h, r in results.items():
        if "error" in r:
            print(f"{h}: FAILED: {r['error']}")
    return ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--iterations", type=int, default=5, help="cycles counted per handler (after a first)")
    ap.add_argument("--kata-config", default=None,
                    help="configuration.toml for the kata handler (the CRI runtime's ConfigPath)")
    ap.add_argument("--pool", type=int, default=0,
                    help="warm VMs for a third handler, kata-pool (0: no such handler)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds for each CRI call")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = ap.parse_args()
    if args.iterations < 1:
        ap.error("--iterations must be at least 1")
    if os.geteuid() != 0:
        print("cri_lifecycle: needs root (containerd, a network namespace)", file=sys.stderr)
        return 1
    missing = cri_missing_tools()
    if missing:
        print(f"cri_lifecycle: missing {', '.join(missing)} (scripts/install.sh installs them)",
              file=sys.stderr)
        return 1
    kata = dataclasses.replace(KATA, options={"ConfigPath": args.kata_config}) if args.kata_config else KATA
    runtimes = {"kata": kata}
    handlers: tuple[str, ...] = HANDLERS
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, Interrupts.handle)
    t0 = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            after: dict[str, Callable[[], None]] = {}
            if args.pool > 0:
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kata-bench-")))
                config = pool_config(tmp / "pool.toml", args.pool,
                                     Path(args.kata_config) if args.kata_config else None)
                runtimes["kata-pool"] = dataclasses.replace(KATA, options={"ConfigPath": str(config)})
                handlers = (*HANDLERS, "kata-pool")
                after["kata-pool"] = stack.enter_context(warm_pool(kata_runtime_path(), config))
                after["kata-pool"]()  # the count of pooled VMs taken starts here: each cycle takes one
            # containerd stops (removing any pod left) before its namespace goes, and before the pool
            netns = stack.enter_context(temporary_netns("ktbench"))
            c = stack.enter_context(containerd_daemon(cri=True, netns=netns, runtimes=runtimes))
            cri = stack.enter_context(c.cri_client(timeout=args.timeout))
            startup = time.monotonic() - t0
            results = measure(cri, c, args.iterations, handlers, after)
    except KataError as e:
        print(f"cri_lifecycle: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cri_lifecycle: interrupted; pods, containerd and its network namespace removed",
              file=sys.stderr)
        return 130
    print(f"containerd (CRI) started and the images imported in {startup:.2f} s")
    ratios = report(results, args.iterations)
    emit({"bench": "cri_lifecycle", "iterations": args.iterations, "kata_config": args.kata_config,
          "pool": args.pool, "daemon_start_s": round(startup, 3), "ratios": ratios, **results}, args.json)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
