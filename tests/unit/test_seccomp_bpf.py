"""Seccomp profiles compiled on the host for crun in the guest (kata.oci.seccomp_bpf): the filter is
loaded into this host's kernel in a child process and must do what the profile says; a profile left
to crun comes back unchanged."""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from kata.oci.crun_annotations import SECCOMP_BPF_DATA as ANNOTATION
from kata.oci.seccomp_bpf import compile_profile, with_compiled_seccomp

REFERENCE = Path("/work/shared/reference/docker-create-config.json")  # as tests/unit/test_specconv.py

# A child that loads the filter (no_new_privs, then seccomp(SET_MODE_FILTER)) and then runs `probe`.
_LOADER = """
    import ctypes, os, sys
    bpf = bytes.fromhex(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    prog = Prog(len(bpf) // 8, bpf)
    assert libc.syscall(317, 1, 0, ctypes.byref(prog)) == 0, ctypes.get_errno()  # seccomp(SET_MODE_FILTER)
"""


def _spec(seccomp: dict[str, Any], **annotations: str) -> dict[str, Any]:
    return {"process": {"args": ["true"]}, "linux": {"seccomp": seccomp}, "annotations": dict(annotations)}


def _one_rule(**rule: Any) -> dict[str, Any]:
    return {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], **rule}]}


def _arg(index: int, op: str) -> dict[str, Any]:
    return {"index": index, "value": 1, "op": op}


def _run_filtered(seccomp: dict[str, Any], probe: str, tmp_path: Path) -> str:
    spec = with_compiled_seccomp(_spec(seccomp))
    bpf = base64.b64decode(spec["annotations"][ANNOTATION])
    code = textwrap.dedent(_LOADER) + textwrap.dedent(probe)
    proc = subprocess.run([sys.executable, "-c", code, bpf.hex()], capture_output=True, text=True, timeout=30,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_dockers_default_profile_compiles_into_the_annotation() -> None:
    spec = json.loads(REFERENCE.read_text())
    before = copy.deepcopy(spec)
    out = with_compiled_seccomp(spec)
    assert spec == before  # the caller's spec is not changed
    bpf = base64.b64decode(out["annotations"][ANNOTATION])
    assert len(bpf) % 8 == 0 and len(bpf) // 8 > 100
    # crun still reads the profile's flags: the section stays.
    assert out["linux"]["seccomp"] == spec["linux"]["seccomp"]
    assert {k: v for k, v in out["annotations"].items() if k != ANNOTATION} == spec.get("annotations", {})


def test_the_filter_does_what_the_profile_says(tmp_path: Path) -> None:
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            # a name this libseccomp does not know is skipped, as crun skips it
            {"names": ["mkdir", "mkdirat", "no_such_syscall"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
            # arguments of distinct indexes: ANDed
            {"names": ["fchmod"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_GE"},
                      {"index": 1, "value": 0o777, "op": "SCMP_CMP_EQ"}]},
            # the same index twice: each comparison a rule of its own, ORed
            {"names": ["umask"], "action": "SCMP_ACT_ERRNO", "errnoRet": 22,
             "args": [{"index": 0, "value": 0o077, "op": "SCMP_CMP_EQ"},
                      {"index": 0, "value": 0o070, "op": "SCMP_CMP_EQ"}]},
        ],
    }
    probe = """
        import os
        def attempt(f):
            try:
                f()
                return "ok"
            except OSError as e:
                return str(e.errno)
        fd = os.open("f", os.O_CREAT | os.O_WRONLY, 0o600)
        print(attempt(lambda: os.mkdir("d")), attempt(lambda: os.fchmod(fd, 0o777)),
              attempt(lambda: os.fchmod(fd, 0o644)))
        for mask in (0o077, 0o070, 0o022):
            print(mask, libc.syscall(95, mask), ctypes.get_errno())  # umask: -1 and the errno when denied
    """
    out = _run_filtered(profile, probe, tmp_path).splitlines()
    assert out[0] == "13 1 ok"  # EACCES from errnoRet, EPERM by default, the other mode allowed
    assert out[1].split()[1:] == ["-1", "22"] and out[2].split()[1:] == ["-1", "22"]
    assert out[3].split()[1] != "-1"


def test_a_kill_action_kills_and_an_errno_default_compiles(tmp_path: Path) -> None:
    # Under an errno default a process could do next to nothing: that profile is only compiled.
    errno_default = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38}
    assert ANNOTATION in with_compiled_seccomp(_spec(errno_default))["annotations"]
    kill = _one_rule(action="SCMP_ACT_KILL_PROCESS")
    kill["syscalls"][0]["names"] = ["getppid"]
    bpf = base64.b64decode(with_compiled_seccomp(_spec(kill))["annotations"][ANNOTATION])
    code = textwrap.dedent(_LOADER) + "\nos.getppid()\nprint('survived')\n"
    proc = subprocess.run([sys.executable, "-c", code, bpf.hex()], capture_output=True, text=True, timeout=30,
                          cwd=tmp_path)
    assert proc.returncode == -31 and "survived" not in proc.stdout  # SIGSYS


def test_a_rule_with_the_default_action_is_skipped_as_crun_skips_it() -> None:
    base = _one_rule(action="SCMP_ACT_ERRNO")
    extra = copy.deepcopy(base)
    extra["syscalls"].append({"names": ["rmdir"], "action": "SCMP_ACT_ALLOW"})
    assert compile_profile(json.dumps(base)) == compile_profile(json.dumps(extra)) is not None


@pytest.mark.parametrize("profile, annotations", [
    (_one_rule(action="SCMP_ACT_NOTIFY"), {}),
    ({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/l.sock"}, {}),
    (_one_rule(action="SCMP_ACT_KILL", errnoRet=1), {}),  # an errno where the action has none
    ({"defaultAction": "SCMP_ACT_ALLOW", "defaultErrnoRet": 1}, {}),
    (_one_rule(action="SCMP_ACT_ERRNO", args=[_arg(6, "SCMP_CMP_EQ")]), {}),
    (_one_rule(action="SCMP_ACT_ERRNO", args=[_arg(0, "SCMP_CMP_XX")]), {}),
    (_one_rule(action="SCMP_ACT_ERRNO", errnoRet=70000), {}),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_NOSUCH"]}, {}),
    ({"defaultAction": "SCMP_ACT_NOSUCH"}, {}),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": "mkdir"}, {}),
    ({"defaultAction": "SCMP_ACT_ALLOW"}, {"run.oci.seccomp_fail_unknown_syscall": "1"}),
])  # fmt: skip
def test_what_is_left_to_crun_comes_back_unchanged(profile: dict[str, Any],
                                                   annotations: dict[str, str]) -> None:
    spec = _spec(profile, **annotations)
    assert with_compiled_seccomp(spec) is spec


def test_a_spec_without_a_profile_is_unchanged() -> None:
    spec: dict[str, Any] = {"process": {"args": ["true"]}, "linux": {}}
    assert with_compiled_seccomp(spec) is spec
    assert with_compiled_seccomp({"process": {}}) == {"process": {}}


@pytest.mark.parametrize("value", [-1, 1 << 64, True, 1.0, "1"])
def test_an_argument_value_crun_would_not_take_is_left_to_it(value: object) -> None:
    bad = _one_rule(action="SCMP_ACT_ERRNO", args=[{"index": 0, "value": value, "op": "SCMP_CMP_EQ"}])
    spec = _spec(bad)
    assert with_compiled_seccomp(spec) is spec
    boolean_index = _one_rule(action="SCMP_ACT_ERRNO",
                              args=[{"index": True, "value": 1, "op": "SCMP_CMP_EQ"}])
    assert compile_profile(json.dumps(boolean_index)) is None
    assert compile_profile(json.dumps(_one_rule(action="SCMP_ACT_ERRNO", args=[
        {"index": 0, "value": (1 << 64) - 1, "op": "SCMP_CMP_EQ"}]))) is not None  # the largest is fine


def test_only_the_first_six_comparisons_count_as_in_crun() -> None:
    six = [_arg(i % 3, "SCMP_CMP_EQ") for i in range(6)]
    seven = [*six, _arg(5, "SCMP_CMP_EQ")]
    assert compile_profile(json.dumps(_one_rule(action="SCMP_ACT_ERRNO", args=six))) == \
        compile_profile(json.dumps(_one_rule(action="SCMP_ACT_ERRNO", args=seven))) is not None


def test_profiles_too_big_are_left_to_crun() -> None:
    many = _one_rule(action="SCMP_ACT_ERRNO")
    many["syscalls"][0]["names"] = ["read"] * 5000  # more rules than a filter may hold
    assert compile_profile(json.dumps(many)) is None
    padded = _one_rule(action="SCMP_ACT_ERRNO")
    padded["syscalls"] += [{"names": [f"nosuch{i}" for i in range(20000)], "action": "SCMP_ACT_ERRNO"}]
    spec = _spec(padded)
    assert len(json.dumps(padded)) > 256 * 1024 and with_compiled_seccomp(spec) is spec


def test_a_callers_own_bpf_annotation_is_dropped() -> None:
    caller = base64.b64encode(b"\0" * 8).decode()
    compiled = with_compiled_seccomp(_spec(_one_rule(action="SCMP_ACT_ERRNO"), **{ANNOTATION: caller}))
    assert compiled["annotations"][ANNOTATION] != caller
    left = with_compiled_seccomp(_spec(_one_rule(action="SCMP_ACT_NOTIFY"), **{ANNOTATION: caller, "x": "y"}))
    assert left["annotations"] == {"x": "y"}
    no_profile = with_compiled_seccomp({"linux": {}, "annotations": {ANNOTATION: caller}})
    assert no_profile["annotations"] == {}


def test_an_older_libseccomp_than_the_guests_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    from kata.oci import seccomp_bpf

    monkeypatch.setattr(seccomp_bpf, "GUEST_LIBSECCOMP", (99, 0, 0))
    seccomp_bpf._libseccomp.cache_clear()
    seccomp_bpf.compile_profile.cache_clear()
    try:
        spec = _spec(_one_rule(action="SCMP_ACT_ERRNO"))
        assert with_compiled_seccomp(spec) is spec
    finally:
        monkeypatch.undo()
        seccomp_bpf._libseccomp.cache_clear()
        seccomp_bpf.compile_profile.cache_clear()
