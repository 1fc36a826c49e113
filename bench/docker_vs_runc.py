#!/usr/bin/env python3
"""kata-runtime against runc as Docker runtimes, in one run, on a private containerd and dockerd
(tests.support.daemons) with the locally built busybox image:

- `docker run --rm IMAGE true`: wall time, median of N;
- `docker exec C true` into a `docker run -d IMAGE sleep 1000` container: wall time, median of N;
- the PSS of the process Docker knows as the container's (`docker inspect -f '{{.State.Pid}}'`, the
  pid in the runtime's --pid-file): the container's own process for runc, kata's host monitor for kata.

    python bench/docker_vs_runc.py [--runs N] [--json FILE] [--kata PATH] [--kata-arg ARG ...] [--pool N]

With --pool N (2 by default; 0 leaves it out) kata is measured once more as runtime "kata-pool", its
sandboxes taking warm VMs from a pool of N (vm_cache_number), full again before every timed run.

Prints a table with the kata/runc ratios and the targets of issue 3, then one JSON line. A runtime that
fails is reported with its error (the others are still measured) and makes the exit status 1.
Figures are medians; this machine is noisy, so read them as orders of magnitude.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import (  # noqa: E402
    RuntimeFailed,
    checked,
    emit,
    fmt,
    pool_config,
    pss_kib,
    ratio,
    timed,
    warm_pool,
)
from kata.errors import KataError  # noqa: E402
from tests.support.daemons import Dockerd, Runtime, docker_daemons, kata_runtime_path  # noqa: E402

RUNTIMES = ("runc", "kata")
# issue 3's targets on this machine under TCG
TARGET_RUN_RATIO = 8.0
TARGET_EXEC_RATIO = 5.0
TARGET_PSS_MB = 12.0
TARGET_POOL_RUN_RATIO = 6.0  # issue 11, with the warm VM pool


def bench_runtime(d: Dockerd, runtime: str, runs: int, timeout: float,
                  before_each: Callable[[], None] = lambda: None) -> dict[str, Any]:
    image = d.image

    def run_true() -> float:
        before_each()
        return timed(d.run, "run", "--rm", "--runtime", runtime, image, "true", timeout=timeout)

    res: dict[str, Any] = {}
    # One untimed run first: the first container of a runtime may pay for one-time work (kata's VM template).
    res["warmup_s"] = run_true()
    res["run_s"] = [run_true() for _ in range(runs)]
    res["run_median_s"] = statistics.median(res["run_s"])
    name = f"bench-{runtime}-{uuid.uuid4().hex[:8]}"
    before_each()
    checked(d.run, "run", "-d", "--name", name, "--runtime", runtime, image, "sleep", "1000", timeout=timeout)
    try:
        pid = int(checked(d.run, "inspect", "-f", "{{.State.Pid}}", name, timeout=60).stdout)
        res["pid"] = pid
        try:
            res["pid_comm"] = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            res["pid_comm"] = None
        res["pss_kib"] = pss_kib(pid)
        res["exec_s"] = [timed(d.run, "exec", name, "true", timeout=timeout) for _ in range(runs)]
        res["exec_median_s"] = statistics.median(res["exec_s"])
        res["pss_kib_after_exec"] = pss_kib(pid)
    finally:
        d.run("rm", "-f", name, timeout=timeout)
    return res


def report(results: dict[str, dict[str, Any]], runs: int) -> dict[str, float | None]:
    ratios = {"run": ratio(results, "run_median_s"), "exec": ratio(results, "exec_median_s")}
    mb = {rt: (r["pss_kib"] / 1024 if r.get("pss_kib") is not None else None) for rt, r in results.items()}
    rows = [("docker run --rm true (s)", "run_median_s", "9.3f", ratios["run"], f"<= {TARGET_RUN_RATIO:g}x"),
            ("docker exec C true (s)", "exec_median_s", "9.3f", ratios["exec"], f"<= {TARGET_EXEC_RATIO:g}x")]
    print(f"medians of {runs} runs; the container's host process is the pid `docker inspect` reports")
    print(f"{'':32s} {'runc':>9s} {'kata':>9s} {'kata/runc':>10s}  target")
    for label, key, spec, rat, target in rows:
        print(f"{label:32s} {fmt(results['runc'].get(key), spec)} {fmt(results['kata'].get(key), spec)} "
              f"{fmt(rat, '9.1f', 'x')}  {target}")
    if "kata-pool" in results:
        ratios["run_pool"] = ratio(results, "run_median_s", "kata-pool")
        pooled = fmt(results["kata-pool"].get("run_median_s"), "9.3f")
        print(f"{'  with the warm VM pool (s)':32s} {'':9s} {pooled} {fmt(ratios['run_pool'], '9.1f', 'x')}  "
              f"<= {TARGET_POOL_RUN_RATIO:g}x")
    pss = f"{fmt(mb.get('runc'), '9.2f')} {fmt(mb.get('kata'), '9.2f')}"
    print(f"{'container host process PSS (MB)':32s} {pss} {'':10s}  kata < {TARGET_PSS_MB:g} MB")
    for rt, r in results.items():
        if "error" in r:
            print(f"{rt}: FAILED: {r['error']}")
        else:
            print(f"{rt}: first run {r['warmup_s']:.3f} s; host process {r.get('pid')} ({r.get('pid_comm')})")
    return ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    ap.add_argument("--kata", default=kata_runtime_path(), help="the kata-runtime binary")
    ap.add_argument("--kata-arg", action="append", default=[], help="extra argument for kata-runtime")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds for each docker command")
    ap.add_argument("--pool", type=int, default=2, help="warm VMs for the kata-pool runtime (0: none)")
    args = ap.parse_args()

    results: dict[str, dict[str, Any]] = {}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kata-bench-pool-") as tmp:
        runtimes = {"kata": Runtime(args.kata, tuple(args.kata_arg))}
        pool_conf = None
        if args.pool > 0:
            # The pool's configuration: the one --kata-arg names (or the one in effect), with the pool on.
            given = args.kata_arg.index("--config") if "--config" in args.kata_arg else None
            base = Path(args.kata_arg[given + 1]) if given is not None else None
            rest = [a for i, a in enumerate(args.kata_arg) if given is None or i not in (given, given + 1)]
            # --debug puts agent.log=debug on the guest's command line: the pool's VMs need it too.
            pool_conf = pool_config(Path(tmp) / "pool.toml", args.pool, base, agent_debug="--debug" in rest)
            runtimes["kata-pool"] = Runtime(args.kata, (*rest, "--config", str(pool_conf)))
        try:
            with docker_daemons(runtimes=runtimes) as d:
                startup = time.monotonic() - t0
                for rt in RUNTIMES:
                    try:
                        results[rt] = bench_runtime(d, rt, args.runs, args.timeout)
                    except RuntimeFailed as e:
                        results[rt] = {"error": str(e)}
                if pool_conf is not None:
                    try:
                        with warm_pool(args.kata, pool_conf) as refilled:
                            results["kata-pool"] = bench_runtime(d, "kata-pool", args.runs, args.timeout,
                                                                 refilled)
                    except RuntimeFailed as e:
                        results["kata-pool"] = {"error": str(e)}
        except KataError as e:
            print(f"docker_vs_runc: {e}", file=sys.stderr)
            return 1
    print(f"containerd + dockerd started and the image loaded in {startup:.2f} s")
    ratios = report(results, args.runs)
    out = {"bench": "docker_vs_runc", "runs": args.runs, "daemons_start_s": round(startup, 3),
           "kata_runtime": args.kata, "ratios": ratios, **results}
    emit(out, args.json)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
