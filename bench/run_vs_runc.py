#!/usr/bin/env python3
"""Cold `kata-runtime run` of `true` against `runc run` (and crun where this host allows) of the
same busybox bundle, in one run, with kata's phase breakdown:

- template: the default, sandboxes restored from a VM template ([factory] enable_template);
- cold: every VM booted from scratch (enable_template = false), sharing files over virtio-fs;
- pool: each sandbox takes a warm VM from the pool daemon (vm_cache_number = --pool, 2 by default;
  0 leaves it out), which is full again before every timed run.

    python bench/run_vs_runc.py [--runs N] [--pool N] [--json FILE]

Figures are medians; this machine is noisy, so read them as orders of magnitude.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import pool_config, warm_pool  # noqa: E402
from kata.config import dump_config, load_config  # noqa: E402
from kata.config.toml_out import dumps  # noqa: E402
from tests.support.bundles import make_busybox_bundle  # noqa: E402

# Guest-side marks from the agent's console lines (seconds since the guest kernel started).
_GUEST_MARKS = {"agent_main": re.compile(r"kata-agent\[\s*([\d.]+)\] info kata-agent starting"),
                "agent_serving": re.compile(r"kata-agent\[\s*([\d.]+)\] info serving on")}


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=300)
    return time.monotonic() - t0, proc


def kata_marks(log: Path) -> dict[str, float]:
    """Host phases (seconds since the command started) and guest marks from one --debug log."""
    marks: dict[str, float] = {}
    for line in log.read_text().splitlines():
        msg = json.loads(line).get("msg", "")
        if msg.startswith("timings "):
            marks.update(json.loads(msg[len("timings "):]))
        for name, rx in _GUEST_MARKS.items():
            m = rx.search(msg)
            if m:
                marks[f"guest_{name}"] = float(m.group(1))
    return marks


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in runs[0]] if runs else []
    return {k: statistics.median(r[k] for r in runs if k in r) for k in keys}


def bench_kata(kata: str, bundle: Path, runs: int, config: Path, tmp: Path, mode: str,
               before_each: Callable[[], None] | None = None) -> dict[str, Any]:
    times, marks = [], []
    for i in range(runs):
        if before_each is not None:
            before_each()
        log = tmp / f"kata-{mode}-{i}.log"
        cid = f"bench-{mode}-{uuid.uuid4().hex[:8]}"
        dt, proc = timed([kata, "--debug", "--log", str(log), "--log-format", "json",
                          "--config", str(config), "run", "--bundle", str(bundle), cid])
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()
            raise SystemExit(f"kata-runtime run ({mode}) failed: {err}")
        times.append(dt)
        marks.append(kata_marks(log))
    if before_each is not None:
        before_each()  # the last run, checked as the others were
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": times,
            "phases_median_s": median_of(marks)}


def bench_runc_like(binary: str, bundle: Path, runs: int) -> dict[str, Any]:
    times = []
    for _ in range(runs):
        cid = f"bench-{Path(binary).name}-{uuid.uuid4().hex[:8]}"
        dt, proc = timed([binary, "run", "--bundle", str(bundle), cid])
        if proc.returncode != 0:
            return {"error": proc.stderr.decode(errors="replace").strip().splitlines()[-1:]}
        times.append(dt)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": times}


def write_config(path: Path, enable_template: bool) -> Path:
    data = dump_config(load_config())
    del data["meta"]
    data["factory"]["enable_template"] = enable_template
    path.write_text(dumps(data))
    return path


def report_phases(name: str, phases: dict[str, float]) -> None:
    print(f"  {name} phases (seconds since the command started; guest_* since the guest kernel started):")
    for p, v in phases.items():
        print(f"    {p:20s} {v:7.3f}")
    launch = phases.get("vmm_launch")
    ready = phases.get("agent_ready")
    if launch is not None and ready is not None:
        print(f"    -> agent ready {ready - launch:.3f} s after the VMM's launch")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--pool", type=int, default=2, help="warm VMs for the pool mode (0: none)")
    args = ap.parse_args()
    kata = shutil.which("kata-runtime") or "/opt/kata-containers/venv/bin/kata-runtime"
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kata-bench-") as tmpdir:
        tmp = Path(tmpdir)
        bundle = make_busybox_bundle(tmp / "bundle", ["true"])
        template_conf = write_config(tmp / "template.toml", True)
        # The template for this shape is made outside the timed runs (as `kata-runtime factory init`).
        subprocess.run([kata, "--debug", "--config", str(template_conf), "factory", "init"],
                       check=True, capture_output=True, timeout=300)
        results["kata_template"] = bench_kata(kata, bundle, args.runs, template_conf, tmp, "template")
        results["kata_cold"] = bench_kata(kata, bundle, args.runs, write_config(tmp / "cold.toml", False),
                                          tmp, "cold")
        if args.pool > 0:
            conf = pool_config(tmp / "pool.toml", args.pool, template_conf, agent_debug=True)
            with warm_pool(kata, conf) as refilled:
                results["kata_pool"] = bench_kata(kata, bundle, args.runs, conf, tmp, "pool", refilled)
        for name in ("runc", "crun"):
            binary = shutil.which(name)
            if binary:
                results[name] = bench_runc_like(binary, bundle, args.runs)

    runc = results.get("runc", {})
    for mode in ("kata_template", "kata_cold", "kata_pool"):
        if mode not in results:
            continue
        r = results[mode]
        line = (f"{mode}: `run` of true, median {r['median_s']:.3f} s (min {r['min_s']:.3f}) "
                f"over {args.runs} runs")
        if "median_s" in runc:
            r["ratio_vs_runc"] = r["median_s"] / runc["median_s"]
            line += f"; {r['ratio_vs_runc']:.1f}x runc"
        print(line)
        report_phases(mode, r["phases_median_s"])
    for name in ("runc", "crun"):
        r = results.get(name)
        if r and "median_s" in r:
            print(f"{name}: `run` of true, median {r['median_s']:.3f} s")
        elif r:
            print(f"{name}: not usable on this host: {r.get('error')}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
