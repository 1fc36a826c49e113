"""The pure part of `runc update`: flags or a JSON file -> OCI LinuxResources, merged into the current ones.

Mirrors runc 1.1's update.go: with `--resources FILE` (or "-" for stdin) every other flag but the
Intel RDT ones is ignored; otherwise each flag sets one field. Values are parsed as runc parses them
(memory sizes through docker/go-units RAMInBytes, "-1" meaning unlimited) and errors are worded like
runc's. A 0 or "" means "leave as is", as it does for runc's cgroup drivers.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Callable
from typing import Any

from kata.errors import KataError, strerror
from kata.utils.files import NotReadable, read_regular_file
from kata.utils.signals import go_quote

_log = logging.getLogger(__name__)

_INT64 = (-(2**63), 2**63 - 1)
_UINT64 = (0, 2**64 - 1)
_UINT16 = (0, 2**16 - 1)

# Fields `runc update` applies, per LinuxResources section: (Go struct, {JSON field: (Go type, range)}).
UPDATE_FIELDS: dict[str, tuple[str, dict[str, tuple[str, tuple[int, int] | None]]]] = {
    "memory": ("LinuxMemory", {
        "limit": ("int64", _INT64), "reservation": ("int64", _INT64), "swap": ("int64", _INT64),
        "kernel": ("int64", _INT64), "kernelTCP": ("int64", _INT64),
    }),
    "cpu": ("LinuxCPU", {
        "shares": ("uint64", _UINT64), "quota": ("int64", _INT64), "period": ("uint64", _UINT64),
        "realtimeRuntime": ("int64", _INT64), "realtimePeriod": ("uint64", _UINT64),
        "cpus": ("string", None), "mems": ("string", None),
    }),
    "blockIO": ("LinuxBlockIO", {"weight": ("uint16", _UINT16)}),
    "pids": ("LinuxPids", {"limit": ("int64", _INT64)}),
}
# runc 1.1 ignores kernel memory limits (the kernel deprecated kmem) and warns.
_IGNORED = {("memory", "kernel"), ("memory", "kernelTCP")}

# docker/go-units v0.4.0 (runc 1.1's): size, optional space, optional binary prefix, optional i and b.
_SIZE = re.compile(r"^([0-9]+(\.[0-9]+)*) ?([kKmMgGtTpP])?[iI]?[bB]?$", re.ASCII)
_BINARY = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_FLOAT = re.compile(r"[0-9]+(\.[0-9]+)?", re.ASCII)
_DECIMAL = re.compile(r"[+-]?[0-9]+", re.ASCII)


class ResourcesError(KataError):
    """An update request runc would refuse; the message is runc's."""


def add_update_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `update`'s flags with runc's names. All are strings: resources_from_args parses them,
    so that a bad value gets runc's message instead of argparse's."""
    parser.add_argument("--resources", "-r", default="",
                        help="path to the file containing the resources to update or '-' to read from "
                             "the standard input; all other options but the RDT ones are then ignored")
    for flag, text in (
        ("--blkio-weight", "Specifies per cgroup weight, range is from 10 to 1000"),
        ("--cpu-period", "CPU CFS period to be used for hardcapping (in usecs). 0 to use system default"),
        ("--cpu-quota", "CPU CFS hardcap limit (in usecs). Allowed cpu time in a given period"),
        ("--cpu-share", "CPU shares (relative weight vs. other containers)"),
        ("--cpu-rt-period", "CPU realtime period to be used for hardcapping (in usecs)"),
        ("--cpu-rt-runtime", "CPU realtime hardcap limit (in usecs)"),
        ("--cpuset-cpus", "CPU(s) to use"),
        ("--cpuset-mems", "Memory node(s) to use"),
        ("--kernel-memory", "(obsoleted; do not use)"),
        ("--kernel-memory-tcp", "(obsoleted; do not use)"),
        ("--memory", "Memory limit (in bytes)"),
        ("--memory-reservation", "Memory reservation or soft_limit (in bytes)"),
        ("--memory-swap", "Total memory usage (memory + swap); set '-1' to enable unlimited swap"),
        ("--pids-limit", "Maximum number of pids allowed in the container"),
        ("--l3-cache-schema", "The string of Intel RDT/CAT L3 cache schema"),
        ("--mem-bw-schema", "The string of Intel RDT/MBA memory bandwidth schema"),
    ):
        parser.add_argument(flag, default=None, help=text)


def ram_in_bytes(size: str) -> int:
    """docker/go-units RAMInBytes: "64m" -> 67108864, "1.5g", "512KiB", "100"; binary multiples."""
    m = _SIZE.match(size)
    if not m:
        raise ValueError(f"invalid size: '{size}'")
    if not _FLOAT.fullmatch(m.group(1)):  # "1.2.3" passes the regexp but not ParseFloat
        raise ValueError(f"strconv.ParseFloat: parsing {go_quote(m.group(1))}: invalid syntax")
    value = float(m.group(1)) * _BINARY.get((m.group(3) or "").lower(), 1)
    return int(value)  # Go's int64(float) truncates toward zero


def resources_from_args(ns: argparse.Namespace, read_stdin: Callable[[], str]) -> dict[str, Any]:
    """The LinuxResources an `update` asks for, from ``ns`` (built by add_update_arguments).

    ``read_stdin`` returns standard input's text, for `--resources -`. Only fields that were asked
    for appear (the guest's `crun update` changes just those).
    """
    source = getattr(ns, "resources", "") or ""
    if source:
        text = read_stdin() if source == "-" else _read_file(source)
        request = parse_resources_json(text)
    else:
        request = _from_flags(ns)
    # Checked whatever the source, as runc does: there is no Intel RDT inside a VM.
    if getattr(ns, "l3_cache_schema", None):
        raise ResourcesError("Intel RDT/CAT: l3 cache schema is not enabled")
    if getattr(ns, "mem_bw_schema", None):
        raise ResourcesError("Intel RDT/MBA: memory bandwidth schema is not enabled")
    return request


def parse_resources_json(text: str) -> dict[str, Any]:
    """Decode `--resources` input, refusing wrong types with Go's encoding/json wording."""
    if not text.strip():
        raise ResourcesError("EOF")  # what Go's json.Decoder says about empty input
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResourcesError(f"invalid JSON: {exc.msg} at offset {exc.pos}") from None
    if not isinstance(data, dict):
        raise ResourcesError(
            f"json: cannot unmarshal {_json_kind(data)} into Go value of type specs.LinuxResources")
    for section, (struct, fields) in UPDATE_FIELDS.items():
        values = data.get(section)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ResourcesError(f"json: cannot unmarshal {_json_kind(values)} into Go struct field "
                                 f"LinuxResources.{section} of type specs.{struct}")
        for name, (go_type, bounds) in fields.items():
            value = values.get(name)
            if value is not None and not _fits(value, go_type, bounds):
                kind = _json_kind(value)
                if kind == "number":
                    kind = f"number {json.dumps(value)}"
                raise ResourcesError(f"json: cannot unmarshal {kind} into Go struct field "
                                     f"{struct}.{section}.{name} of type {go_type}")
    return data


def _from_flags(ns: argparse.Namespace) -> dict[str, Any]:
    """runc's flag form: each given flag sets one field."""
    def flag(name: str) -> str:
        value = getattr(ns, name.replace("-", "_"), None)
        return "" if value is None else str(value)

    request: dict[str, dict[str, Any]] = {}

    def put(section: str, name: str, value: Any) -> None:
        request.setdefault(section, {})[name] = value

    weight = _go_flag_int(flag("blkio-weight"), "blkio-weight")
    if weight:
        if not _UINT16[0] <= weight <= _UINT16[1]:
            raise ResourcesError(f'invalid value "{flag("blkio-weight")}" for flag -blkio-weight: '
                                 "value out of range")
        put("blockIO", "weight", weight)
    if flag("cpuset-cpus"):
        put("cpu", "cpus", flag("cpuset-cpus"))
    if flag("cpuset-mems"):
        put("cpu", "mems", flag("cpuset-mems"))
    for opt, name in (("cpu-period", "period"), ("cpu-rt-period", "realtimePeriod"), ("cpu-share", "shares")):
        if flag(opt):
            put("cpu", name, _parse_decimal(flag(opt), opt, "ParseUint", _UINT64))
    for opt, name in (("cpu-quota", "quota"), ("cpu-rt-runtime", "realtimeRuntime")):
        if flag(opt):
            put("cpu", name, _parse_decimal(flag(opt), opt, "ParseInt", _INT64))
    for opt, name in (("memory", "limit"), ("memory-swap", "swap"), ("memory-reservation", "reservation")):
        raw = flag(opt)
        if not raw:
            continue
        try:
            put("memory", name, -1 if raw == "-1" else ram_in_bytes(raw))
        except ValueError as exc:
            raise ResourcesError(f"invalid value for {opt}: {exc}") from None
    for opt in ("kernel-memory", "kernel-memory-tcp"):
        if flag(opt):
            _log.warning("Setting --%s is ignored and will be removed", opt)
    pids = _go_flag_int(flag("pids-limit"), "pids-limit")
    if pids:
        put("pids", "limit", pids)
    return request


def _go_flag_int(raw: str, name: str) -> int:
    """A urfave/cli IntFlag (Go's flag package, base 0); 0 when not given."""
    if not raw:
        return 0
    try:
        value = int(raw, 0)
    except ValueError:
        raise ResourcesError(f'invalid value "{raw}" for flag -{name}: parse error') from None
    if not _INT64[0] <= value <= _INT64[1]:
        raise ResourcesError(f'invalid value "{raw}" for flag -{name}: value out of range')
    return value


def _parse_decimal(raw: str, opt: str, func: str, bounds: tuple[int, int]) -> int:
    """Go's strconv.ParseUint/ParseInt(raw, 10, 64), with runc's "invalid value for OPT: ..." wrapper."""
    signed = func == "ParseInt"
    if not _DECIMAL.fullmatch(raw) or (not signed and raw[0] in "+-"):
        reason = "invalid syntax"
    else:
        value = int(raw)
        if bounds[0] <= value <= bounds[1]:
            return value
        reason = "value out of range"
    raise ResourcesError(f"invalid value for {opt}: strconv.{func}: parsing {go_quote(raw)}: {reason}")


def _read_file(path: str) -> str:
    try:
        return read_regular_file(path).decode("utf-8")
    except OSError as exc:
        raise ResourcesError(f"open {path}: {strerror(exc)}") from None
    except (NotReadable, UnicodeDecodeError) as exc:
        raise ResourcesError(f"read {path}: {exc}") from None


def _fits(value: Any, go_type: str, bounds: tuple[int, int] | None) -> bool:
    if go_type == "string":
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return bounds is None or bounds[0] <= value <= bounds[1]


def _json_kind(value: Any) -> str:
    """The JSON kind Go names in an unmarshal error."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
