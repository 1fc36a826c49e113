"""A container's seccomp profile (linux.seccomp) compiled to BPF on the host, for crun in the guest.

crun compiles linux.seccomp with libseccomp at every create. Under TCG that is about 60 ms of the guest's
CPU for Docker's default profile (357 syscalls), and 11 ms natively. crun also takes a filter compiled
elsewhere, base64 in the annotation run.oci.seccomp_bpf_data, and then compiles nothing (it still reads
linux.seccomp's flags). The host and the guest run the same architecture; the host's libseccomp must be
at least the guest's (GUEST_LIBSECCOMP): an older one would not know some syscalls and would skip their
rules, where the guest's crun enforces them. That annotation is ours: a caller's is dropped.

The profile is translated here as crun 1.8 does: the default action and its errno (EPERM unless
defaultErrnoRet), one rule per syscall name with the rule's action (ERRNO and TRACE with errnoRet,
EPERM by default), rules whose action is the default one skipped, unknown syscall names skipped, the
arguments of a rule ANDed unless one argument index repeats (then one rule per comparison, ORed). A
profile this module would not translate exactly as crun does (a notify action or listener, an errno
for an action without one, an argument index past 5, run.oci.seccomp_fail_unknown_syscall, an
unknown action, operator, architecture or value, or a profile too big to be worth it) is left to
crun, which also words its errors.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
from typing import Any

from kata.oci.crun_annotations import SECCOMP_BPF_DATA, SECCOMP_FAIL_UNKNOWN_SYSCALL, seccomp_bpf_value

_EPERM = 1
_ACTIONS = {
    "SCMP_ACT_KILL": 0x00000000, "SCMP_ACT_KILL_THREAD": 0x00000000, "SCMP_ACT_KILL_PROCESS": 0x80000000,
    "SCMP_ACT_TRAP": 0x00030000, "SCMP_ACT_LOG": 0x7FFC0000, "SCMP_ACT_ALLOW": 0x7FFF0000,
}  # fmt: skip
_WITH_ERRNO = {"SCMP_ACT_ERRNO": 0x00050000, "SCMP_ACT_TRACE": 0x7FF00000}
_OPERATORS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4, "SCMP_CMP_GE": 5,
              "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
_SONAME = "libseccomp.so.2"  # by soname: ctypes.util.find_library would run ldconfig
_SCMP_ERROR = -1  # seccomp_syscall_resolve_name's answer for a name it does not know
_MAX_ARGS = 6  # crun looks at a rule's first six comparisons only
# Debian 12's libseccomp2, which the guest image's crun uses (kata/osbuilder; checked by
# tests/integration/test_rootfs_image.py).
GUEST_LIBSECCOMP = (2, 5, 4)
# Bigger profiles are left to crun: compiling is the host's (root's) CPU, and a filter of more rules
# than this would not load anyway (BPF programs hold at most 4096 instructions).
_MAX_PROFILE_BYTES = 256 * 1024
_MAX_RULES = 4096


class _Untranslated(Exception):
    """The profile holds something left to crun."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


@functools.cache
def _libseccomp() -> Any:
    try:
        lib = ctypes.CDLL(_SONAME, use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_version.restype = ctypes.POINTER(_Version)
    version = lib.seccomp_version().contents
    if (version.major, version.minor, version.micro) < GUEST_LIBSECCOMP:
        return None
    return lib


def with_compiled_seccomp(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with its seccomp profile compiled into the annotation crun reads instead; otherwise
    (no profile, one left to crun, no suitable libseccomp on this host) ``spec`` as it is, but for a
    caller's own such annotation, which would override linux.seccomp: it is dropped."""
    seccomp = (spec.get("linux") or {}).get("seccomp")
    annotations = spec.get("annotations") or {}
    if not isinstance(annotations, dict):
        return spec
    bpf = None
    if isinstance(seccomp, dict) and SECCOMP_FAIL_UNKNOWN_SYSCALL not in annotations:
        profile = json.dumps(seccomp, sort_keys=True)
        if len(profile) <= _MAX_PROFILE_BYTES:
            bpf = compile_profile(profile)
    if bpf is None:
        if SECCOMP_BPF_DATA not in annotations:
            return spec
        return {**spec, "annotations": {k: v for k, v in annotations.items() if k != SECCOMP_BPF_DATA}}
    return {**spec, "annotations": {**annotations, SECCOMP_BPF_DATA: seccomp_bpf_value(bpf)}}


@functools.lru_cache(maxsize=8)  # a shim compiles the same profile for each container of its pod
def compile_profile(profile_json: str) -> bytes | None:
    """The BPF program of an OCI seccomp profile (JSON), or None if it is left to crun."""
    lib = _libseccomp()
    if lib is None:
        return None
    try:
        profile = json.loads(profile_json)
        default = _action(profile.get("defaultAction"), profile.get("defaultErrnoRet"))
        if profile.get("listenerPath"):
            raise _Untranslated("a seccomp listener")
        ctx = lib.seccomp_init(default)
        if not ctx:
            raise _Untranslated("seccomp_init failed")
        try:
            _add_architectures(lib, ctx, profile.get("architectures") or [])
            budget = [_MAX_RULES]
            for rule in profile.get("syscalls") or []:
                _add_rule(lib, ctx, rule, default, budget)
            return _export(lib, ctx)
        finally:
            lib.seccomp_release(ctx)
    except (_Untranslated, TypeError, ValueError, AttributeError, OSError):
        return None


def _action(name: object, errno_ret: object) -> int:
    if name in _WITH_ERRNO:
        errno = _EPERM if errno_ret is None else errno_ret
        if not isinstance(errno, int) or isinstance(errno, bool) or not 0 <= errno <= 0xFFFF:
            raise _Untranslated(f"errno {errno!r}")
        return _WITH_ERRNO[str(name)] | errno
    if errno_ret is not None or name not in _ACTIONS:
        raise _Untranslated(f"action {name!r}")
    return _ACTIONS[str(name)]


def _add_architectures(lib: Any, ctx: int, architectures: list[Any]) -> None:
    for arch in architectures:
        name = str(arch).removeprefix("SCMP_ARCH_").lower()
        token = lib.seccomp_arch_resolve_name(name.encode())
        if token == 0:
            raise _Untranslated(f"architecture {arch!r}")
        rc = lib.seccomp_arch_add(ctx, token)
        if rc < 0 and rc != -17:  # -EEXIST: the native one, added by seccomp_init
            raise _Untranslated(f"architecture {arch!r}: {rc}")


def _add_rule(lib: Any, ctx: int, rule: dict[str, Any], default: int, budget: list[int]) -> None:
    action = _action(rule.get("action"), rule.get("errnoRet"))
    if action == default:
        return
    cmps = []
    for arg in (rule.get("args") or [])[:_MAX_ARGS]:
        index, value, value_two = arg.get("index", 0), arg.get("value", 0), arg.get("valueTwo", 0)
        if not (_u64(index) and index < _MAX_ARGS and _u64(value) and _u64(value_two)
                and arg.get("op") in _OPERATORS):
            raise _Untranslated(f"argument {arg!r}")
        cmps.append(_ArgCmp(index, _OPERATORS[arg["op"]], value, value_two))
    # An index that repeats cannot be ANDed with itself: each comparison is a rule of its own (ORed).
    distinct = len({c.arg for c in cmps}) == len(cmps)
    groups = [cmps] if distinct else [[c] for c in cmps]
    for name in rule.get("names") or []:
        nr = lib.seccomp_syscall_resolve_name(str(name).encode())
        if nr == _SCMP_ERROR:
            continue  # crun skips a name its libseccomp does not know, with a warning
        budget[0] -= len(groups)
        if budget[0] < 0:
            raise _Untranslated("too many rules")
        for group in groups:
            array = (_ArgCmp * len(group))(*group) if group else None
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(group), array)
            if rc < 0:
                raise _Untranslated(f"rule for {name!r}: {rc}")


def _u64(value: object) -> bool:
    """An unsigned 64-bit integer as crun's parser takes it (ctypes would wrap anything else)."""
    return type(value) is int and 0 <= value < 1 << 64


def _export(lib: Any, ctx: int) -> bytes:
    fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
    try:
        rc = lib.seccomp_export_bpf(ctx, fd)
        if rc < 0:
            raise _Untranslated(f"seccomp_export_bpf: {rc}")
        size = os.lseek(fd, 0, os.SEEK_END)
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)
