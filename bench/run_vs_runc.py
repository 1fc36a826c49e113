#!/usr/bin/env python3
"""Cold `kata-runtime run` of `true` against `runc run` (and crun where this host allows) of the
same busybox bundle, in one run; plus kata's phase breakdown from its debug log.

    python bench/run_vs_runc.py [--runs N] [--json FILE]

Figures are medians; this machine is noisy, so read them as orders of magnitude.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kata.bundles import make_busybox_bundle  # noqa: E402

PHASES = ("config", "virtiofsd_ready", "vmm_launched", "agent_ready", "sandbox_created",
          "container_created", "container_started", "container_exited", "destroyed")


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, timeout=300)
    return time.monotonic() - t0, proc


def kata_phases(log: Path) -> dict[str, float]:
    for line in reversed(log.read_text().splitlines()):
        msg = json.loads(line).get("msg", "")
        if msg.startswith("timings "):
            return dict(json.loads(msg[len("timings "):]))
    return {}


def bench_runtime(name: str, argv: list[str], bundle: Path, runs: int) -> dict[str, object]:
    times = []
    for _ in range(runs):
        cid = f"bench-{name}-{uuid.uuid4().hex[:8]}"
        dt, proc = timed([*argv, "run", "--bundle", str(bundle), cid])
        if proc.returncode != 0:
            return {"error": proc.stderr.decode(errors="replace").strip().splitlines()[-1:]}
        times.append(dt)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": times}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    kata = shutil.which("kata-runtime") or "/opt/kata-containers/venv/bin/kata-runtime"
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="kata-bench-") as tmp:
        bundle = make_busybox_bundle(Path(tmp) / "bundle", ["true"])
        # kata, with its phase breakdown from the debug log of each run
        phases: list[dict[str, float]] = []
        times = []
        for i in range(args.runs):
            log = Path(tmp) / f"kata-{i}.log"
            cid = f"bench-kata-{uuid.uuid4().hex[:8]}"
            dt, proc = timed([kata, "--debug", "--log", str(log), "--log-format", "json",
                              "run", "--bundle", str(bundle), cid])
            if proc.returncode != 0:
                err = proc.stderr.decode(errors="replace").strip()
                print(f"kata-runtime run failed: {err}", file=sys.stderr)
                return 1
            times.append(dt)
            phases.append(kata_phases(log))
        results["kata"] = {"median_s": statistics.median(times), "min_s": min(times), "runs": times}
        results["kata_phases_median_s"] = {
            p: statistics.median(ph[p] for ph in phases if p in ph)
            for p in PHASES if any(p in ph for ph in phases)
        }
        for name in ("runc", "crun"):
            binary = shutil.which(name)
            if binary:
                results[name] = bench_runtime(name, [binary], bundle, args.runs)
    kata_median = results["kata"]["median_s"]  # type: ignore[index]
    print(f"kata-runtime run true: median {kata_median:.3f} s over {args.runs} runs")
    for name in ("runc", "crun"):
        r = results.get(name)
        if isinstance(r, dict) and "median_s" in r:
            ratio = kata_median / r["median_s"]
            results[f"ratio_kata_vs_{name}"] = ratio
            print(f"{name} run true:         median {r['median_s']:.3f} s  -> kata/{name} = {ratio:.1f}x")
        elif isinstance(r, dict):
            print(f"{name}: not usable here: {r.get('error')}")
    print("kata phases (seconds since the command started, medians):")
    for p, v in results["kata_phases_median_s"].items():  # type: ignore[union-attr]
        print(f"  {p:18s} {v:7.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
