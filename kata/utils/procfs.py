"""Figures of a process and of the system, read from /proc: what the metrics report on both sides of the
VM boundary (the host about QEMU, virtiofsd and the shim; the guest agent about itself and its kernel).

Plain stdlib and plain dicts, since the guest agent loads it too (its image has this file). Every reader
returns what it could parse and skips the rest: a figure that is missing is left out, never guessed.
Keys are the kernel's own names; the metrics layer picks and renames what it reports.
"""

from __future__ import annotations

import os

# Fields of /proc/PID/stat after the command name, by the kernel's numbering (proc(5)) less 3.
_STAT_FIELDS = {"utime": 11, "stime": 12, "cutime": 13, "cstime": 14, "num_threads": 17, "starttime": 19,
                "vsize": 20}
# /proc/PID/status lines in kB that are reported, as bytes; the others are counts.
_STATUS_KB = ("VmPeak", "VmSize", "VmLck", "VmPin", "VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem",
              "VmData", "VmStk", "VmExe", "VmLib", "VmPTE", "VmSwap", "HugetlbPages")
_STATUS_COUNTS = ("Threads", "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")
# /proc/stat's cpu columns, in order.
CPU_COLUMNS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest", "guest_nice")
STAT_COUNTERS = ("ctxt", "btime", "processes", "procs_running", "procs_blocked")
# /proc/net/dev's columns, in order, with the names Kata reports them by.
NETDEV_COLUMNS = ("recv_bytes", "recv_packets", "recv_errs", "recv_drop", "recv_fifo", "recv_frame",
                  "recv_compressed", "recv_multicast", "sent_bytes", "sent_packets", "sent_errs",
                  "sent_drop", "sent_fifo", "sent_colls", "sent_carrier", "sent_compressed")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return ""


def _number(text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= 0 else None


def clock_ticks() -> int:
    """USER_HZ: the unit of the CPU times in /proc/PID/stat and /proc/stat."""
    return os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (the state first); None once the process
    is gone. The name may hold spaces and ')': the split is after the last ')'."""
    raw = _read(f"/proc/{pid}/stat")
    if ")" not in raw:
        return None
    return raw[raw.rindex(")") + 2:].split()


def process_stat(pid: int | str) -> dict[str, int]:
    """CPU times (clock ticks), threads, start time (ticks after boot) and virtual size of a process."""
    fields = stat_fields(pid)
    if fields is None:
        return {}
    out = {}
    for name, index in _STAT_FIELDS.items():
        value = _number(fields[index]) if index < len(fields) else None
        if value is not None:
            out[name] = value
    return out


def process_status(pid: int | str) -> dict[str, int]:
    """Memory figures of /proc/PID/status in bytes, and its thread and context switch counts."""
    out = {}
    for line in _read(f"/proc/{pid}/status").splitlines():
        key, _, rest = line.partition(":")
        words = rest.split()
        if not words:
            continue
        value = _number(words[0])
        if value is None:
            continue
        if key in _STATUS_KB:
            out[key] = value * 1024
        elif key in _STATUS_COUNTS:
            out[key] = value
    return out


def process_io(pid: int | str) -> dict[str, int]:
    """/proc/PID/io as it is (rchar, wchar, syscr, syscw, read_bytes, write_bytes, cancelled_write_bytes)."""
    return _key_values(_read(f"/proc/{pid}/io"), ":")


def open_fds(pid: int | str) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def pss_bytes(pid: int | str) -> int | None:
    """The process's proportional share of the memory it maps (smaps_rollup), in bytes."""
    for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
        if line.startswith("Pss:"):
            value = _number(line.split()[1]) if len(line.split()) > 1 else None
            return None if value is None else value * 1024
    return None


def meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """Every line of /proc/meminfo by the kernel's name, in bytes (counts, the HugePages_* lines, as is)."""
    out = {}
    for line in _read(path).splitlines():
        key, _, rest = line.partition(":")
        words = rest.split()
        value = _number(words[0]) if words else None
        if value is not None and key:
            out[key] = value * 1024 if words[-1] == "kB" else value
    return out


def cpu_times(path: str = "/proc/stat") -> dict[str, dict[str, int]]:
    """Clock ticks per CPU column, for "cpu" (all CPUs) and each "cpuN"."""
    out = {}
    for line in _read(path).splitlines():
        words = line.split()
        if not words or not words[0].startswith("cpu"):
            continue
        times = {}
        for name, text in zip(CPU_COLUMNS, words[1:], strict=False):
            value = _number(text)
            if value is not None:
                times[name] = value
        out[words[0]] = times
    return out


def stat_counters(path: str = "/proc/stat") -> dict[str, int]:
    """The kernel's counters of /proc/stat (context switches, forks, running and blocked processes)."""
    return {k: v for k, v in _key_values(_read(path), " ").items() if k in STAT_COUNTERS}


def loadavg(path: str = "/proc/loadavg") -> dict[str, float]:
    """load1, load5, load15, and the running (cur) and total (max) task counts, as Kata names them."""
    words = _read(path).split()
    if len(words) < 4:
        return {}
    out: dict[str, float] = {}
    for name, text in zip(("load1", "load5", "load15"), words, strict=False):
        try:
            out[name] = float(text)
        except ValueError:
            pass
    running, _, total = words[3].partition("/")
    for name, text in (("cur", running), ("max", total)):
        value = _number(text)
        if value is not None:
            out[name] = value
    return out


def netdev(path: str = "/proc/net/dev") -> dict[str, dict[str, int]]:
    """Counters per interface of /proc/net/dev (the reading process's network namespace)."""
    out = {}
    for line in _read(path).splitlines()[2:]:
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        values = [_number(w) for w in rest.split()]
        out[name.strip()] = {k: v for k, v in zip(NETDEV_COLUMNS, values, strict=False) if v is not None}
    return out


def _key_values(text: str, sep: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(sep)
        words = rest.split()
        value = _number(words[0]) if words else None
        if value is not None and key.strip():
            out[key.strip()] = value
    return out
