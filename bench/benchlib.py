"""What the benchmarks share: client commands that must succeed (timed or not), the PSS of processes,
kata/runc ratios, table cells, and the JSON line every run ends with.

The scripts run as ``python bench/NAME.py`` with the repository root put first on sys.path, so they
import this module as ``bench.benchlib``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.daemons import DaemonError

# A daemon client: Dockerd.run or Containerd.ctr (``*args``, ``timeout=``), whose caller checks the status.
Client = Callable[..., subprocess.CompletedProcess[str]]


class RuntimeFailed(Exception):
    """One runtime's measurement failed; the others are still measured."""


def checked(run: Client, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``run(*args)``, or RuntimeFailed with the error line that explains the failure."""
    try:
        proc = run(*args, timeout=timeout)
    except DaemonError as e:
        raise RuntimeFailed(str(e)) from e
    if proc.returncode != 0:
        # The daemon's answer, not the CLI's later noise ("error waiting for container: context canceled").
        lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("WARNING")]
        # ctr's error spans lines when a shim's own stderr is quoted in it.
        errors = [ln for ln in lines if "Error response from daemon" in ln] or [" ".join(lines)[-400:]]
        detail = errors[0] or "(no error output)"
        raise RuntimeFailed(f"`{' '.join(args[:4])} ...` exited {proc.returncode}: {detail}")
    return proc


def timed(run: Client, *args: str, timeout: float) -> float:
    """Wall time of a command that must succeed."""
    t0 = time.monotonic()
    checked(run, *args, timeout=timeout)
    return time.monotonic() - t0


def pss_kib(pid: int) -> int | None:
    """Sum of Pss in /proc/PID/smaps_rollup, in KiB (None once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def processes() -> dict[int, tuple[int, list[str]]]:
    """pid -> (parent pid, argv) of every running process but this one."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # from the state (3rd field) on
        if fields[0] in ("Z", "X") or not raw:  # exited, or a kernel thread
            continue
        table[int(entry)] = (int(fields[1]), raw.rstrip(b"\0").decode(errors="replace").split("\0"))
    return table


def with_descendants(roots: set[int], table: Mapping[int, tuple[int, list[str]]]) -> set[int]:
    found = set(roots)
    while more := {pid for pid, (ppid, _) in table.items() if ppid in found and pid not in found}:
        found |= more
    return found


def ratio(results: Mapping[str, Mapping[str, Any]], key: str, name: str = "kata") -> float | None:
    """``name``'s figure (kata's) over runc's, when both were measured."""
    kata, runc = results.get(name, {}), results.get("runc", {})
    if key in kata and key in runc and runc[key]:
        return float(kata[key]) / float(runc[key])
    return None


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """A table cell: the value in ``spec`` (e.g. "9.3f"), or a dash as wide when it is missing."""
    width = int(spec.split(".")[0])
    return (format(value, spec) + suffix) if value is not None else "-".rjust(width) + " " * len(suffix)


def emit(result: Mapping[str, Any], path: Path | None) -> None:
    """A run's results as one JSON line on stdout, and into ``path`` when given."""
    print(json.dumps(result))
    if path is not None:
        path.write_text(json.dumps(result, indent=1))


def pool_config(path: Path, vms: int, base: Path | None = None, agent_debug: bool = False) -> Path:
    """``base`` (the configuration in effect when None) with a warm VM pool of ``vms`` clones.
    ``agent_debug``: for runs with `--debug`, which puts agent.log=debug on the guest's command line:
    the pool's VMs must have it too to be of the same shape."""
    from kata.config import dump_config, load_config
    from kata.config.toml_out import dumps

    cfg = load_config(base)
    data = dump_config(cfg)
    del data["meta"]
    data["factory"]["vm_cache_number"] = vms
    if agent_debug:
        data["agent"][cfg.agent.name]["enable_debug"] = True
    path.write_text(dumps(data))
    return path


@contextmanager
def warm_pool(kata: str, config: Path, timeout: float = 180.0) -> Iterator[Callable[[], None]]:
    """The VM pool daemon of ``config`` as `kata-runtime factory init` starts it, full; yields a call
    to make before each timed run: it waits until the pool is full again (the figures are those of a
    pool that keeps up), and fails a run that did not take exactly one pooled VM. Stopped after, its
    VMs with it."""
    from kata.config import load_config
    from kata.factory import pool

    endpoint = Path(load_config(config).factory.vm_cache_endpoint)
    proc = subprocess.run([kata, "--config", str(config), "factory", "init"], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeFailed(f"factory init: {proc.stderr.strip()[-400:]}")

    def full() -> int:
        """Wait until the pool is full; how many VMs it has handed out."""
        deadline = time.monotonic() + timeout
        while True:
            st = pool.call(endpoint, {"op": "status"}, 5.0)
            if len(st["ready"]) >= st["target"]:
                return int(st["taken"])
            if time.monotonic() > deadline:
                raise RuntimeFailed(f"the VM pool did not fill within {timeout:g}s: {st.get('last_error')}")
            time.sleep(0.1)

    taken: list[int] = []

    def before_run() -> None:
        now = full()
        # Each run between two calls must have taken a pooled VM: one of another shape would have
        # been restored, silently, and measured as the pool's.
        if taken and now != taken[-1] + 1:
            raise RuntimeFailed(f"a run took {now - taken[-1]} pooled VMs, not 1 "
                                "(another VM shape than the pool's?)")
        taken.append(now)

    try:
        full()
        yield before_run
    finally:
        pool.stop(endpoint)
