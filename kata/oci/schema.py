"""The JSON types of the runtime-spec's fields, checked before anything reads them.

runc decodes config.json into Go structs, so a field of the wrong type (a string for a uid, a float
for a limit, a negative size) is refused before the container exists. We pass the spec on to crun
in the guest: without the same check, such a spec would boot a VM only to fail inside it. Pure: the
schema is data, ``problem`` returns the first mismatch as a one-line message. A JSON null stands for
an absent field, as it does for Go.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kata.oci.resources import UPDATE_FIELDS


@dataclass(frozen=True)
class Kind:
    """A scalar's type: how messages name it, and the test."""

    name: str
    test: Callable[[Any], bool]


def _int_kind(bits: int, signed: bool) -> Kind:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    name = "an integer" if signed and bits == 64 else f"an integer from {lo} to {hi}"
    # bool is an int in Python, not in JSON.
    return Kind(name, lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi)


STR = Kind("a string", lambda v: isinstance(v, str))
BOOL = Kind("a boolean", lambda v: isinstance(v, bool))
OBJECT = Kind("an object", lambda v: isinstance(v, dict))  # whose contents another program checks
INT32, INT64 = _int_kind(32, True), _int_kind(64, True)
UINT16, UINT32, UINT64 = _int_kind(16, False), _int_kind(32, False), _int_kind(64, False)
_GO_KINDS = {"string": STR, "int64": INT64, "uint64": UINT64, "uint16": UINT16}


@dataclass(frozen=True)
class MapOf:
    """An object with any keys, each value of one schema (annotations, sysctls)."""

    value: Any


# A schema is a Kind, a MapOf, a dict (an object with these optional fields: others are not ours to
# check), or a one-item list (an array of that item).
STRS = [STR]
_ID_MAPPING = {"containerID": UINT32, "hostID": UINT32, "size": UINT32}
_DEVICE_RULE = {"allow": BOOL, "type": STR, "major": INT64, "minor": INT64, "access": STR}
_WEIGHT_DEVICE = {"major": INT64, "minor": INT64, "weight": UINT16, "leafWeight": UINT16}
_THROTTLE_DEVICE = {"major": INT64, "minor": INT64, "rate": UINT64}
CAPABILITY_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")

PROCESS: dict[str, Any] = {
    "terminal": BOOL,
    "consoleSize": {"height": UINT32, "width": UINT32},
    "user": {"uid": UINT32, "gid": UINT32, "umask": UINT32, "additionalGids": [UINT32], "username": STR},
    "args": STRS,
    "commandLine": STR,
    "env": STRS,
    "cwd": STR,
    "capabilities": dict.fromkeys(CAPABILITY_SETS, STRS),
    "rlimits": [{"type": STR, "hard": UINT64, "soft": UINT64}],
    "noNewPrivileges": BOOL,
    "apparmorProfile": STR,
    "oomScoreAdj": INT32,
    "selinuxLabel": STR,
}


def _resources() -> dict[str, Any]:
    """linux.resources: the fields `runc update` knows (kata.oci.resources), and the others."""
    res: dict[str, Any] = {section: {name: _GO_KINDS[go] for name, (go, _) in fields.items()}
                           for section, (_, fields) in UPDATE_FIELDS.items()}
    res["memory"].update(swappiness=UINT64, disableOOMKiller=BOOL, useHierarchy=BOOL)
    res["cpu"].update(idle=INT64)
    res["blockIO"].update(leafWeight=UINT16, weightDevice=[_WEIGHT_DEVICE],
                          **dict.fromkeys(("throttleReadBpsDevice", "throttleWriteBpsDevice",
                                           "throttleReadIOPSDevice", "throttleWriteIOPSDevice"),
                                          [_THROTTLE_DEVICE]))
    res.update(devices=[_DEVICE_RULE], hugepageLimits=[{"pageSize": STR, "limit": UINT64}],
               network={"classID": UINT32, "priorities": [{"name": STR, "priority": UINT32}]},
               rdma=MapOf({"hcaHandles": UINT32, "hcaObjects": UINT32}), unified=MapOf(STR))
    return res


_HOOK = {"path": STR, "args": STRS, "env": STRS, "timeout": INT64}

SPEC: dict[str, Any] = {
    "ociVersion": STR,
    "process": PROCESS,
    "root": {"path": STR, "readonly": BOOL},
    "hostname": STR,
    "domainname": STR,
    "mounts": [{"destination": STR, "source": STR, "options": STRS, "type": STR,
                "uidMappings": [_ID_MAPPING], "gidMappings": [_ID_MAPPING]}],
    "hooks": dict.fromkeys(("prestart", "createRuntime", "createContainer", "startContainer", "poststart",
                            "poststop"), [_HOOK]),
    "annotations": MapOf(STR),
    "linux": {
        "uidMappings": [_ID_MAPPING],
        "gidMappings": [_ID_MAPPING],
        "sysctl": MapOf(STR),
        "resources": _resources(),
        "cgroupsPath": STR,
        "namespaces": [{"type": STR, "path": STR}],
        "devices": [{"path": STR, "type": STR, "major": INT64, "minor": INT64, "fileMode": UINT32,
                     "uid": UINT32, "gid": UINT32}],
        # The guest's crun reads these whole; their insides are its to check.
        "seccomp": OBJECT,
        "intelRdt": OBJECT,
        "personality": OBJECT,
        "rootfsPropagation": STR,
        "maskedPaths": STRS,
        "readonlyPaths": STRS,
        "mountLabel": STR,
    },
}


def problem(value: Any, schema: Any, where: str) -> str | None:
    """The first way ``value`` does not fit ``schema``, as "<where> must be ...", or None."""
    if value is None:
        return None
    if isinstance(schema, Kind):
        return None if schema.test(value) else f"{where} must be {schema.name}"
    if isinstance(schema, list):
        return _array_problem(value, schema[0], where)
    if not isinstance(value, dict):
        return f"{where} must be an object"
    if isinstance(schema, MapOf):
        return _first(_item_problem(v, schema.value, f"{where}[{k}]") for k, v in value.items())
    return _first(problem(value.get(key), sub, f"{where}.{key}" if where else key)
                  for key, sub in schema.items())


def _array_problem(value: Any, item: Any, where: str) -> str | None:
    if item is STR:  # the common case, named as one: "process.args must be an array of strings"
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return None if ok else f"{where} must be an array of strings"
    if not isinstance(value, list):
        return f"{where} must be an array"
    return _first(_item_problem(v, item, f"{where}[{i}]") for i, v in enumerate(value))


def _item_problem(value: Any, schema: Any, where: str) -> str | None:
    """An array's item or a map's value: a null there is no absent field, but a hole."""
    return f"{where} must not be null" if value is None else problem(value, schema, where)


def _first(problems: Any) -> str | None:
    return next((p for p in problems if p), None)


__all__ = ["CAPABILITY_SETS", "PROCESS", "SPEC", "Kind", "MapOf", "problem"]
