"""The agent's warm-up: what it runs, that it always ends reported done, and how GetGuestDetails shows it."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kata.guest.agent.crun import Crun
from kata.guest.agent.reaper import Reaper
from kata.guest.agent.sandbox import InvalidArgument, Sandbox
from kata.guest.agent.service import AgentService
from kata.guest.agent.warmup import CONTAINER_ID, SECCOMP_PROGRAM, Warmup
from kata.oci.crun_annotations import SECCOMP_BPF_DATA
from kata.protocols import agent_pb2 as pb


def test_guest_details_report_warm_only_once_warmed(tmp_path: Path) -> None:
    reaper = Reaper()
    sandbox = Sandbox(reaper, Crun(reaper), run_dir=str(tmp_path))
    warmup = Warmup(sandbox)
    svc = AgentService(sandbox, warmup=warmup)
    req = pb.GetGuestDetailsRequest()
    assert not svc.get_guest_details(None, req).agent_details.warm  # type: ignore[arg-type]
    warmup.done.set()
    assert svc.get_guest_details(None, req).agent_details.warm  # type: ignore[arg-type]


def test_agent_without_warmup_reports_warm(tmp_path: Path) -> None:
    reaper = Reaper()
    svc = AgentService(Sandbox(reaper, Crun(reaper), run_dir=str(tmp_path)))
    assert svc.get_guest_details(None, pb.GetGuestDetailsRequest()).agent_details.warm  # type: ignore[arg-type]


def test_failed_warmup_is_still_done(tmp_path: Path) -> None:
    reaper = Reaper()
    w = Warmup(Sandbox(reaper, Crun(reaper, binary=str(tmp_path / "no-crun")), run_dir=str(tmp_path)))
    w.run(grace=0)  # spawning the missing crun fails before any child exists: no reaper thread needed
    assert w.done.is_set()
    assert not (tmp_path / CONTAINER_ID).exists()


def test_no_warmup_once_the_host_creates_a_sandbox(tmp_path: Path) -> None:
    reaper = Reaper()
    fake = tmp_path / "crun"
    fake.write_text("#!/bin/sh\ntouch \"$0.ran\"\n")
    fake.chmod(0o755)
    sandbox = Sandbox(reaper, Crun(reaper, binary=str(fake)), run_dir=str(tmp_path))
    sandbox.id = "sb"  # a cold boot: the host's CreateSandbox came first
    w = Warmup(sandbox)
    w.run(grace=0)
    assert w.done.is_set()
    assert not (tmp_path / "crun.ran").exists()


def _in_fresh_python(tmp_path: Path, crun_script: str, body: str) -> subprocess.CompletedProcess[str]:
    """``body`` run with a reaper ``r`` and a Sandbox ``sandbox`` whose crun is ``crun_script``
    (at tmp_path/crun), in a fresh interpreter: a running reaper calls waitpid(-1) and would steal
    the children of anything else in pytest."""
    fake = tmp_path / "crun"
    fake.write_text(crun_script)
    fake.chmod(0o755)
    prologue = f"""
        from kata.guest.agent.crun import Crun
        from kata.guest.agent.reaper import Reaper
        from kata.guest.agent.sandbox import InvalidArgument, Sandbox
        from kata.guest.agent.service import AgentService
        from kata.guest.agent.warmup import Warmup
        from kata.protocols import agent_pb2 as pb
        r = Reaper(); r.start()
        sandbox = Sandbox(r, Crun(r, binary={str(fake)!r}), run_dir={str(tmp_path / "run")!r})
    """
    code = textwrap.dedent(prologue) + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_warmup_runs_a_container_through_crun(tmp_path: Path) -> None:
    # A fake crun that keeps its argv and the bundle's config.
    script = '#!/bin/sh\necho "$@" > "$0.args"\ncp "${10}/config.json" "$0.config"\n'
    proc = _in_fresh_python(tmp_path, script, """
        w = Warmup(sandbox)
        w.start()
        assert w.done.wait(30)
    """)
    run_dir = tmp_path / "run"
    assert "warm-up done" in proc.stderr and "warn" not in proc.stderr
    bundle = run_dir / CONTAINER_ID
    args = (tmp_path / "crun.args").read_text().split()
    assert args[-5:] == ["run", "--no-new-keyring", "--bundle", str(bundle), CONTAINER_ID]
    spec = json.loads((tmp_path / "crun.config").read_text())
    assert spec["root"]["path"] == "rootfs"
    # Docker's device rules and a compiled seccomp program in crun's annotation, as a host's container has.
    devices = spec["linux"]["resources"]["devices"]
    assert devices[0] == {"allow": False, "access": "rwm"} and {"allow": True, "type": "c", "major": 1,
                                                                "minor": 3, "access": "rwm"} in devices
    assert base64.b64decode(spec["annotations"][SECCOMP_BPF_DATA]) == SECCOMP_PROGRAM
    assert not bundle.exists()  # removed once crun is done


def test_a_kernel_without_seccomp_or_bpf_device_rules_still_gets_the_rest(tmp_path: Path) -> None:
    # A fake crun that fails a container with the seccomp program, as one on such a kernel would.
    script = ('#!/bin/sh\necho "$@" >> "$0.calls"\n'
              'case "$*" in *" run "*)\n'
              '  if grep -q seccomp_bpf_data "${10}/config.json"; then exit 1; fi;;\nesac\n')
    proc = _in_fresh_python(tmp_path, script, """
        Warmup(sandbox).run_container()
    """)
    calls = [line.split() for line in (tmp_path / "crun.calls").read_text().splitlines()]
    assert ["run" in c for c in calls] == [True, False, True] and "delete" in calls[1], calls
    assert "once more without device rules and seccomp" in proc.stderr


# The warm-up's seccomp program installed in a child by the kernel, which checks it: every system call
# works but the one it refuses (number -1: EPERM where the kernel alone says ENOSYS).
_INSTALL = """
import ctypes, ctypes.util, errno, sys
from kata.guest.agent.warmup import SECCOMP_PROGRAM
libc = ctypes.CDLL(None, use_errno=True)
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
prog = Prog(len(SECCOMP_PROGRAM) // 8, SECCOMP_PROGRAM)
if libc.syscall(-1) == -1 and ctypes.get_errno() == errno.EPERM:
    print("filtered already")  # under a seccomp profile of its own: EPERM would prove nothing
    sys.exit(0)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0, ctypes.get_errno()  # PR_SET_SECCOMP, FILTER
assert libc.syscall(-1) == -1 and ctypes.get_errno() == errno.EPERM, ctypes.get_errno()
print(open("/proc/self/status").read().split("Seccomp:")[1].split()[0])
"""


def test_the_warmup_seccomp_program_is_one_the_kernel_takes() -> None:
    proc = subprocess.run([sys.executable, "-c", _INSTALL], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    if proc.stdout.strip() == "filtered already":
        pytest.skip("this test runs under a seccomp profile that refuses system call -1 already")
    assert proc.stdout.strip() == "2"  # filter mode


def test_host_asks_for_the_warmup_again_only_before_a_sandbox(tmp_path: Path) -> None:
    # A VM kept warm (the pool) asks for the warm-up container again after its restore; each run goes
    # through crun. Once a sandbox exists the call is refused and crun is not run.
    proc = _in_fresh_python(tmp_path, '#!/bin/sh\necho "$@" >> "$0.args"\n', """
        svc = AgentService(sandbox, warmup=Warmup(sandbox))
        svc.warm_up(None, pb.WarmUpRequest())
        svc.warm_up(None, pb.WarmUpRequest())
        sandbox.id = "sb"
        try:
            svc.warm_up(None, pb.WarmUpRequest())
        except InvalidArgument as e:
            print("refused:", e)
    """)
    run_dir = tmp_path / "run"
    assert "refused: a warm-up runs only before a sandbox exists" in proc.stdout
    runs = (tmp_path / "crun.args").read_text().splitlines()
    assert len(runs) == 2 and all(r.split()[-1] == CONTAINER_ID for r in runs), runs
    assert not (run_dir / CONTAINER_ID).exists()


def test_agent_without_warmup_refuses_the_call(tmp_path: Path) -> None:
    reaper = Reaper()
    svc = AgentService(Sandbox(reaper, Crun(reaper), run_dir=str(tmp_path)))
    with pytest.raises(InvalidArgument, match="no warm-up"):
        svc.warm_up(None, pb.WarmUpRequest())  # type: ignore[arg-type]
