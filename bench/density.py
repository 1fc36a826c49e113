#!/usr/bin/env python3
"""How many idle pods this host holds, and what each costs: N idle busybox pods (`sleep`) started one
after another, under containerd (`ctr run -d`, kata's shim against runc's and crun's), through
containerd's CRI as kubelet starts a pod (`--front cri`: RunPodSandbox on containerd's CNI bridge,
then the container; handlers kata and runc) and Docker (`docker run -d --runtime ...`), in one run:

- the time to start each pod (the first, the median and the last);
- host memory per pod: the drop in MemAvailable over N, and the PSS of the pods' host processes
  by kind (VMM, virtiofsd, shim, the shim zygote, monitor, container) over N (a running zygote is
  stopped before each count: the first pod starts it, and it counts; containerd's teardown stops
  it at the end);
- the host's CPU while the N pods idle, over --idle seconds, as a share of all cores, less what the
  host used before the first pod started, and each kind of process's share of one core;
- whether every pod answers an exec (`true`) afterwards;
- with ``--spike MB``: each pod then runs a process that touches MB of memory and exits (busybox
  `dd` of /dev/zero with a buffer that size), and the drop in MemAvailable per pod is measured
  again --settle seconds later: what a pod keeps of a spike its workload is done with.

    python bench/density.py [--counts 1,10,50] [--front containerd,docker] [--runtimes runc,crun,kata]
                            [--settle S] [--idle S] [--spike MB] [--json FILE]

``--counts max`` keeps adding pods (up to --max-pods) until a start fails, an exec does not answer,
or MemAvailable falls under --floor-mb: the largest N this host holds. The pods of one count are
removed before the next count starts. Figures are from a noisy 2-core machine: read them as orders
of magnitude, and as ratios to runc's within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import (  # noqa: E402
    Client,
    RuntimeFailed,
    checked,
    emit,
    fmt,
    processes,
    pss_kib,
)
from kata.errors import KataError  # noqa: E402
from kata.shim import zygote  # noqa: E402
from tests.support.cri_config import KATA  # noqa: E402
from tests.support.daemons import (  # noqa: E402
    Runtime,
    containerd_daemon,
    docker_daemons,
    kata_runtime_path,
)
from tests.support.netns import temporary_netns  # noqa: E402

SHIM_TYPES = {"runc": "io.containerd.runc.v2", "crun": "io.containerd.runc.v2",
              "kata": "io.containerd.kata.v2"}
CRUN = "/usr/bin/crun"
KINDS = ("qemu", "virtiofsd", "shim", "zygote", "monitor", "container")
# issue 11's targets on this machine under TCG
TARGET_MB_PER_POD = 60.0
TARGET_IDLE_CPU_AT_100 = 0.25
TARGET_LAST_OVER_FIRST = 1.5


def mem_available_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def cpu_busy_fraction(seconds: float) -> float:
    """The share of all cores busy over ``seconds`` (from /proc/stat: everything but idle and iowait)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields[:8]) - idle, sum(fields[:8])

    busy0, total0 = sample()
    time.sleep(seconds)
    busy1, total1 = sample()
    return (busy1 - busy0) / max(1, total1 - total0)


def process_kind(argv: list[str]) -> str | None:
    """What a host process is to a pod, by its command line; None for what is not a pod's."""
    names = [Path(a).name for a in argv[:3]]
    joined = " ".join(names)
    if names and names[0].startswith("qemu-system"):
        return "qemu"
    if names and names[0].startswith("virtiofsd"):
        return "virtiofsd"
    if "containerd-shim" in joined:
        return "shim"
    if "kata.shim.zygote" in argv[:3]:
        return "zygote"  # the process kata's shims are forked from (one per host)
    if "kata.runc.monitor" in argv[:4] or "kata-runtime" in joined:
        return "monitor"
    if names and names[0] in ("sleep", "pause"):
        return "container"  # runc's and crun's pods run on the host (a CRI pod's sandbox: pause)
    return None


def pss_by_kind() -> dict[str, int]:
    totals = dict.fromkeys(KINDS, 0)
    for pid, (_, argv) in processes().items():
        k = process_kind(argv)
        if k is not None:
            totals[k] += pss_kib(pid) or 0
    return totals


def cpu_ticks_by_kind() -> dict[str, int]:
    """utime + stime (clock ticks) of the pods' host processes, summed by kind."""
    totals = dict.fromkeys(KINDS, 0)
    for pid, (_, argv) in processes().items():
        k = process_kind(argv)
        if k is None:
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        totals[k] += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return totals


def idle_cpu(seconds: float) -> tuple[float, dict[str, float]]:
    """The host's busy share over ``seconds``, and each kind's share of one core over it."""
    ticks0 = cpu_ticks_by_kind()
    busy = cpu_busy_fraction(seconds)
    ticks1 = cpu_ticks_by_kind()
    hz = os.sysconf("SC_CLK_TCK")
    return busy, {k: (ticks1[k] - ticks0[k]) / hz / seconds for k in KINDS}


@dataclass
class Front:
    """How one container manager starts, probes and removes an idle pod of one runtime."""

    name: str
    runtime: str
    start: Callable[[str], None]  # RuntimeFailed when the pod did not start
    exec: Callable[[str, list[str]], bool]  # whether the command ran in the pod and exited 0
    remove: Callable[[str], None]


def cli_front(name: str, runtime: str, run: Client, start_args: Callable[[str], list[str]],
              exec_args: Callable[[str, list[str]], list[str]], remove: Callable[[str], None],
              timeout: float) -> Front:
    """A front whose client is a command line (ctr, docker)."""
    def start(pid: str) -> None:
        checked(run, *start_args(pid), timeout=timeout)

    return Front(name, runtime, start,
                 lambda pid, cmd: run(*exec_args(pid, cmd), timeout=timeout).returncode == 0,
                 remove)


def containerd_front(c: Any, runtime: str, kata_config: str | None, timeout: float) -> Front:
    extra = ["--runc-binary", CRUN] if runtime == "crun" else []
    if runtime == "kata" and kata_config:
        extra = ["--runtime-config-path", kata_config]  # as the CRI's ConfigPath

    def remove(pid: str) -> None:
        c.ctr("tasks", "delete", "--force", pid, timeout=120)
        c.ctr("containers", "delete", pid, timeout=60)

    return cli_front("containerd", runtime, c.ctr,
                     lambda pid: ["run", "-d", "--null-io", "--runtime", SHIM_TYPES[runtime], *extra,
                                  c.image, pid, "sleep", "1000000"],
                     lambda pid, cmd: ["tasks", "exec", "--exec-id", f"x{uuid.uuid4().hex[:8]}", pid, *cmd],
                     remove, timeout)


def docker_front(d: Any, runtime: str, timeout: float) -> Front:
    def remove(pid: str) -> None:
        d.run("rm", "-f", pid, timeout=120)

    return cli_front("docker", runtime, d.run,
                     lambda pid: ["run", "-d", "--runtime", runtime, "--name", pid, d.image,
                                  "sleep", "1000000"],
                     lambda pid, cmd: ["exec", pid, *cmd], remove, timeout)


def cri_front(c: Any, cri: Any, runtime: str, timeout: float) -> Front:
    """Kubernetes' way: a pod sandbox on containerd's CNI bridge (RunPodSandbox), then its container
    (CreateContainer, StartContainer), through the CRI, with the runtime handler ``runtime``."""
    from tests.support.cri import CriError, pod_config

    containers: dict[str, str] = {}
    sandboxes: dict[str, str] = {}

    def start(pid: str) -> None:
        config = pod_config(pid, "default", uuid.uuid4().hex[:12], cgroup_parent=c.cgroup_parent)
        try:
            sandboxes[pid] = cri.run_pod_sandbox(config, runtime)
            containers[pid] = cri.create_container(sandboxes[pid], config, "sleeper", c.image,
                                                   ["sleep", "1000000"])
            cri.start_container(containers[pid])
        except CriError as e:
            raise RuntimeFailed(str(e)) from e

    def run(pid: str, cmd: list[str]) -> bool:
        try:
            return bool(cri.exec_sync(containers[pid], cmd, timeout=int(timeout)).exit_code == 0)
        except (CriError, KeyError):
            return False

    def remove(pid: str) -> None:
        if pid in sandboxes:
            with contextlib.suppress(CriError):
                cri.remove_pod(sandboxes.pop(pid))
        containers.pop(pid, None)

    return Front("cri", runtime, start, run, remove)


def measure(front: Front, count: int | None, args: argparse.Namespace) -> dict[str, Any]:
    """Start ``count`` pods (None: as many as the host holds), measure them idle, remove them.
    A shim zygote is stopped first: the first pod starts one, and its memory counts."""
    zygote.stop()
    time.sleep(args.settle)
    base_mem = mem_available_kib()
    base_pss = pss_by_kind()
    base_cpu = cpu_busy_fraction(args.idle)
    pods: list[str] = []
    starts: list[float] = []
    stopped_by = ""
    limit = count if count is not None else args.max_pods
    try:
        while len(pods) < limit:
            pid = f"dens-{front.runtime}-{len(pods)}-{uuid.uuid4().hex[:6]}"
            pods.append(pid)
            try:
                t0 = time.monotonic()
                front.start(pid)
                starts.append(time.monotonic() - t0)
            except RuntimeFailed as e:
                if count is not None:
                    raise
                stopped_by = f"start {len(pods)} failed: {e}"
                break
            if count is None and mem_available_kib() < args.floor_mb * 1024:
                stopped_by = f"MemAvailable under {args.floor_mb} MB"
                break
            if count is None and len(pods) % 10 == 0:
                if not front.exec(pods[-1], ["true"]):
                    stopped_by = f"pod {len(pods)} did not answer an exec"
                    break
        n = len(starts)
        time.sleep(args.settle)  # boot-time pages settle; guests go idle
        mem_drop = base_mem - mem_available_kib()
        pss = {k: v - base_pss[k] for k, v in pss_by_kind().items()}
        busy, by_kind = idle_cpu(args.idle)
        idle = max(0.0, busy - base_cpu)
        answered = sum(1 for pid in pods[:n] if front.exec(pid, ["true"]))
        after_spike, pss_after_spike, spikes_failed = spike(front, pods[:n], base_mem, base_pss, args) \
            if args.spike and n else (None, {}, 0)
    finally:
        t0 = time.monotonic()
        for pid in pods:
            front.remove(pid)
        removal = time.monotonic() - t0
    res: dict[str, Any] = {
        "pods": n, "answered": answered, "start_s": [round(s, 3) for s in starts],
        "first_start_s": starts[0] if starts else None,
        "median_start_s": statistics.median(starts) if starts else None,
        "last_start_s": starts[-1] if starts else None,
        "mem_per_pod_mb": mem_drop / 1024 / n if n else None,
        "pss_per_pod_mb": {k: v / 1024 / n for k, v in pss.items()} if n else {},
        "idle_cpu": idle, "idle_cpu_per_pod": idle / n if n else None,
        # each kind's share of one core per pod (a process that ended in the window counts partly)
        "idle_core_per_pod": {k: v / n for k, v in by_kind.items()} if n else {},
        "host_cpu_before": base_cpu, "removal_s": removal,
        "mem_per_pod_after_spike_mb": after_spike, "pss_per_pod_after_spike_mb": pss_after_spike,
        "spikes_failed": spikes_failed,
    }
    if stopped_by:
        res["stopped_by"] = stopped_by
    return res


def spike(front: Front, pods: list[str], base_mem: int, base_pss: dict[str, int],
          args: argparse.Namespace) -> tuple[float, dict[str, float], int]:
    """MemAvailable's drop per pod --settle seconds after each pod ran a process that touched
    ``--spike`` MB and exited, the pods' PSS by kind per pod then, and how many spikes failed (a
    --spike larger than a pod's free memory)."""
    dd = ["dd", "if=/dev/zero", "of=/dev/null", f"bs={args.spike}M", "count=1"]
    failed = sum(1 for pid in pods if not front.exec(pid, dd))
    time.sleep(args.settle)
    drop = (base_mem - mem_available_kib()) / 1024 / len(pods)
    return drop, {k: (v - base_pss[k]) / 1024 / len(pods) for k, v in pss_by_kind().items()}, failed


def measure_counts(front: Front, counts: list[int | None], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    warm = f"dens-warm-{uuid.uuid4().hex[:6]}"
    try:
        # One untimed pod first: kata's first sandbox makes its VM template.
        front.start(warm)
    except RuntimeFailed as e:
        return [{"front": front.name, "runtime": front.runtime, "error": str(e)}]
    finally:
        front.remove(warm)
    for count in counts:
        row: dict[str, Any] = {"front": front.name, "runtime": front.runtime, "count": count}
        try:
            row.update(measure(front, count, args))
        except RuntimeFailed as e:
            row["error"] = str(e)
        rows.append(row)
        print(f"... {front.name} {front.runtime} N={row.get('pods', count)} done", flush=True)
    return rows


@contextmanager
def fronts(name: str, runtimes: list[str], kata_config: str | None, timeout: float) -> Iterator[list[Front]]:
    if name == "containerd":
        with containerd_daemon() as c:
            yield [containerd_front(c, rt, kata_config, timeout) for rt in runtimes]
    elif name == "cri":
        # The CRI's handlers are runc and kata (crun is not one); pods on containerd's CNI bridge, in a
        # network namespace of its own.
        kata = dataclasses.replace(KATA, options={"ConfigPath": kata_config}) if kata_config else KATA
        with temporary_netns("ktdens") as netns, \
                containerd_daemon(cri=True, netns=netns, runtimes={"kata": kata}) as c, \
                c.cri_client(timeout=timeout) as cri:
            skipped = [rt for rt in runtimes if rt not in ("runc", "kata")]
            if skipped:
                print(f"density: the CRI's handlers are runc and kata: {', '.join(skipped)} not measured",
                      file=sys.stderr)
            yield [cri_front(c, cri, rt, timeout) for rt in runtimes if rt in ("runc", "kata")]
    else:
        kata_args = ("--config", kata_config) if kata_config else ()
        kata_rt = {"kata": Runtime(kata_runtime_path(), kata_args)} if "kata" in runtimes else {}
        crun = {"crun": Runtime(CRUN, ())} if "crun" in runtimes else {}
        with docker_daemons(runtimes={**kata_rt, **crun}) as d:
            yield [docker_front(d, rt, timeout) for rt in runtimes]


def report(rows: list[dict[str, Any]]) -> None:
    print(f"{'front':10s} {'runtime':7s} {'N':>4s} {'ok':>4s} {'first s':>8s} {'median s':>8s} "
          f"{'last s':>8s} "
          f"{'MB/pod':>7s} {'PSS/pod':>7s} {'idle CPU':>8s} {'/pod':>6s}")
    for r in rows:
        if "error" in r:
            print(f"{r['front']:10s} {r['runtime']:7s} FAILED: {r['error']}")
            continue
        pss = sum(r["pss_per_pod_mb"].values()) if r["pss_per_pod_mb"] else None
        per_pod = r["idle_cpu_per_pod"] * 100 if r["idle_cpu_per_pod"] is not None else None
        print(f"{r['front']:10s} {r['runtime']:7s} {r['pods']:4d} {r['answered']:4d} "
              f"{fmt(r['first_start_s'], '8.2f')} {fmt(r['median_start_s'], '8.2f')} "
              f"{fmt(r['last_start_s'], '8.2f')} "
              f"{fmt(r['mem_per_pod_mb'], '7.1f')} {fmt(pss, '7.1f')} {r['idle_cpu'] * 100:7.1f}% "
              f"{fmt(per_pod, '5.2f', '%')}" + (f"  ({r['stopped_by']})" if "stopped_by" in r else ""))
    print(f"targets (kata, default configuration): <= {TARGET_MB_PER_POD:g} MB/pod at N=20; 100 pods idle "
          f"<= {TARGET_IDLE_CPU_AT_100 * 100:g}% of the host's CPU; "
          f"last start <= {TARGET_LAST_OVER_FIRST:g}x first")
    for r in rows:
        if r.get("pss_per_pod_mb"):
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in r["pss_per_pod_mb"].items() if abs(v) >= 0.05)
            cpu = ", ".join(f"{k} {v * 100:.2f}%" for k, v in r["idle_core_per_pod"].items() if v)
            print(f"{r['front']} {r['runtime']} N={r['pods']}: per pod, PSS by kind (MB): {kinds}; "
                  f"idle CPU by kind (of one core): {cpu or 'none'}")
        if r.get("mem_per_pod_after_spike_mb") is not None:
            after = r["pss_per_pod_after_spike_mb"]
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in after.items() if abs(v) >= 0.05)
            print(f"{r['front']} {r['runtime']} N={r['pods']}: MemAvailable drop per pod after each touched "
                  f"and freed its spike: {r['mem_per_pod_after_spike_mb']:.1f} MB (idle before: "
                  f"{r['mem_per_pod_mb']:.1f} MB); PSS by kind then (MB): {kinds}"
                  + (f"; {r['spikes_failed']} spikes FAILED" if r["spikes_failed"] else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--counts", default="1,10", help="comma-separated pod counts; 'max' for as many as fit")
    ap.add_argument("--front", default="containerd",
                    help="containerd (ctr), cri (pods through containerd's CRI, on its CNI bridge) "
                         "or docker; several comma-separated")
    ap.add_argument("--runtimes", default="runc,crun,kata")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds before each measurement")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds over which idle CPU is measured")
    ap.add_argument("--max-pods", type=int, default=200, help="the most pods 'max' starts")
    ap.add_argument("--floor-mb", type=int, default=1024,
                    help="'max' stops when MemAvailable falls under this")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds for each client command")
    ap.add_argument("--kata-config", default=None,
                    help="configuration.toml for kata (e.g. with shared_fs = \"virtio-9p\")")
    ap.add_argument("--spike", type=int, default=0,
                    help="MB each pod's process touches and frees before memory is measured again")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = ap.parse_args()
    counts: list[int | None] = [None if c == "max" else int(c) for c in args.counts.split(",")]
    runtimes = args.runtimes.split(",")
    rows: list[dict[str, Any]] = []
    for front_name in args.front.split(","):
        try:
            with fronts(front_name, runtimes, args.kata_config, args.timeout) as fs:
                for front in fs:
                    rows += measure_counts(front, counts, args)
        except KataError as e:
            print(f"density: {front_name}: {e}", file=sys.stderr)
            return 1
    report(rows)
    emit({"bench": "density", "settle_s": args.settle, "idle_s": args.idle, "rows": rows}, args.json)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
