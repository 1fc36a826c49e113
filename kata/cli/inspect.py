"""`state`, `list`, `ps` and `events`: what runc reports about containers, in its formats."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from kata.cli.lifecycle import store
from kata.runc.state import ContainerRecord
from kata.sandbox.status import Status

# A `ps` line is a process's row: its command line can be long, but not without bound.
_PS_LINE_LIMIT = 4096


def add_parser(sub: Any) -> None:
    p = sub.add_parser("state", help="print the state of a container as JSON")
    p.add_argument("container_id")
    p.set_defaults(func=state)

    p = sub.add_parser("list", help="list the containers under --root")
    p.add_argument("--format", "-f", choices=("table", "json"), default="table")
    p.add_argument("--quiet", "-q", action="store_true", help="only the ids")
    p.set_defaults(func=list_containers)

    p = sub.add_parser("ps", help="list the processes running in a container")
    p.add_argument("--format", "-f", choices=("table", "json"), default="table")
    p.add_argument("container_id")
    p.add_argument("ps_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=ps)

    p = sub.add_parser("events", help="print the container's resource usage")
    p.add_argument("--stats", action="store_true", help="print the statistics once and exit")
    p.add_argument("--interval", default="5s", help="how often to print the statistics")
    p.add_argument("container_id")
    p.set_defaults(func=events)


def full_state(rec: ContainerRecord) -> dict[str, Any]:
    """runc's `state` document: the OCI state plus rootfs, created and owner."""
    doc = rec.oci_state()
    doc.update(rootfs=rec.rootfs, created=rec.created, owner=rec.owner)
    return doc


def state(args: argparse.Namespace) -> int:
    print(json.dumps(full_state(store(args).load(args.container_id)), indent=2))
    return 0


def list_containers(args: argparse.Namespace) -> int:
    from kata.cli.tables import list_table

    records = store(args).list()
    if args.quiet:
        for rec in records:
            print(rec.id)
    elif args.format == "json":
        print(json.dumps([full_state(rec) for rec in records]))
    else:
        sys.stdout.write(list_table(full_state(rec) for rec in records))
    return 0


def ps(args: argparse.Namespace) -> int:
    """json: the host pids that stand for the container's processes (the monitors), which are what
    containerd's shim knows them by; table: the guest's own `ps` of the container."""
    from kata.runc.operations import agent_of

    rec = store(args).load(args.container_id)
    if args.format == "json":
        if rec.current_status() is Status.STOPPED:
            print("[]")
            return 0
        pids = [rec.pid, *(p.pid for p in rec.live_execs().values())]
        print(json.dumps(pids))
        return 0
    from kata.utils.text import printable

    with agent_of(rec) as agent:
        listing = agent.list_processes(container_id=rec.id, format="table", args=args.ps_args or ["-ef"])
    # The guest writes this table: each line is printed escaped (no terminal control) and bounded.
    lines = listing.process_list.decode(errors="replace").splitlines()
    sys.stdout.write("".join(printable(line, _PS_LINE_LIMIT) + "\n" for line in lines))
    return 0


def _interval(text: str) -> float:
    from kata.errors import KataError

    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            try:
                return float(text[: -len(suffix)]) * units[suffix]
            except ValueError:
                break
    raise KataError(f"invalid duration {text!r}")


def stats_event(rec: ContainerRecord) -> dict[str, Any]:
    """One runc `events` record of type "stats", from the guest's cgroup statistics."""
    from kata.runc.operations import agent_of

    with agent_of(rec) as agent:
        cg = agent.stats_container(container_id=rec.id).cgroup_stats
    usage, throttling = cg.cpu_stats.cpu_usage, cg.cpu_stats.throttling_data
    mem = cg.memory_stats

    def memory(d: Any) -> dict[str, int]:
        return {"limit": d.limit, "usage": d.usage, "max": d.max_usage, "failcnt": d.failcnt}

    data = {
        "cpu": {"usage": {"total": usage.total_usage, "percpu": list(usage.percpu_usage),
                          "kernel": usage.usage_in_kernelmode, "user": usage.usage_in_usermode},
                "throttling": {"periods": throttling.periods,
                               "throttledPeriods": throttling.throttled_periods,
                               "throttledTime": throttling.throttled_time}},
        "memory": {"cache": mem.cache, "usage": memory(mem.usage), "swap": memory(mem.swap_usage),
                   "kernel": memory(mem.kernel_usage), "raw": dict(mem.stats)},
        "pids": {"current": cg.pids_stats.current, "limit": cg.pids_stats.limit},
    }
    return {"type": "stats", "id": rec.id, "data": data}


def events(args: argparse.Namespace) -> int:
    from kata.errors import KataError

    st = store(args)
    interval = _interval(args.interval)
    while True:
        rec = st.load(args.container_id)
        if rec.current_status() is Status.STOPPED:
            if args.stats:
                raise KataError(f"container {rec.id} is not running")
            return 0  # the stream ends with the container
        print(json.dumps(stats_event(rec)), flush=True)
        if args.stats:
            return 0
        time.sleep(interval)
