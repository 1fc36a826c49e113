"""containerd-shim-kata-v2's command line, as containerd runs it (no containerd needed for these)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def shim(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "kata.shim", *args], capture_output=True, cwd=cwd, env=env,
                          timeout=60)


def test_version_and_info() -> None:
    version = shim("-v")
    assert version.returncode == 0 and b"containerd-shim-kata-v2" in version.stdout
    info = json.loads(shim("-info").stdout)
    assert info["name"] == "containerd-shim-kata-v2" and "features" in info


def test_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    for args in (("start",), ("-namespace", "default", "-id", "x"), (), ("-bogus",),
                 ("-namespace", "default", "-id", "../x", "start"),
                 ("-namespace", "default", "-id", "../x", "delete"),
                 ("-namespace", "../ns", "-id", "x", "delete")):
        proc = shim(*args, cwd=tmp_path)
        assert proc.returncode == 1 and proc.stderr.count(b"\n") == 1, proc.stderr
        assert b"Traceback" not in proc.stderr and proc.stdout == b""
        assert b"../" not in proc.stderr or b"invalid id format: ../" in proc.stderr


def test_delete_of_a_task_without_a_shim_answers_a_delete_response(tmp_path: Path) -> None:
    from kata.protocols.containerd.runtime.v2.task import shim_pb2

    (tmp_path / "config.json").write_text("{}")
    proc = shim("-namespace", "default", "-address", "/run/nothing.sock", "-id", "no-such-task", "delete",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    resp = shim_pb2.DeleteResponse.FromString(proc.stdout)
    assert resp.exit_status == 137 and resp.exited_at.seconds > 0


def _leftover_sandbox(tmp_path: Path, sid: str,
                      record: dict[str, object] | None) -> tuple[dict[str, str], Path]:
    """A sandbox's state as a killed shim leaves it, under a state root of the test's own, with the
    default configuration made unusable (KATA_CONF_FILE names a broken file)."""
    broken = tmp_path / "broken.toml"
    broken.write_text("[hypervisor.qemu]\ndefault_memory = 'lots'\n")
    env = {"KATA_STATE_ROOT": str(tmp_path / "vc"), "KATA_SHARED_ROOT": str(tmp_path / "shared"),
           "KATA_CONF_FILE": str(broken)}
    state = tmp_path / "vc" / "sbs" / sid
    state.mkdir(parents=True)
    if record is not None:
        (state / "pod.json").write_text(json.dumps(record))
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "config.json").write_text("{}")
    return env, state


def _shim_delete(env: dict[str, str], sid: str, bundle: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "kata.shim", "-namespace", "default", "-address",
                           "/run/nothing.sock", "-id", sid, "delete"], capture_output=True, cwd=bundle,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=60)


def test_shim_delete_tears_down_with_the_configuration_the_pod_was_made_with(tmp_path: Path) -> None:
    from kata.config.load import PACKAGED_CONFIG

    env, state = _leftover_sandbox(tmp_path, "pod1", {"config": str(PACKAGED_CONFIG), "annotations": {}})
    proc = _shim_delete(env, "pod1", tmp_path / "bundle")
    assert proc.returncode == 0 and b"cleanup of sandbox" not in proc.stderr, proc.stderr
    assert not state.exists()


def test_shim_delete_without_a_record_says_what_it_could_not_do(tmp_path: Path) -> None:
    # No record: only the default configuration is left, and it is broken here.
    env, state = _leftover_sandbox(tmp_path, "pod1", None)
    proc = _shim_delete(env, "pod1", tmp_path / "bundle")
    assert proc.returncode == 0, proc.stderr  # containerd still gets its DeleteResponse
    assert b"cleanup of sandbox pod1" in proc.stderr and b"default_memory" in proc.stderr, proc.stderr
    assert b"Traceback" not in proc.stderr
    assert state.exists()


# A teardown killed after its first removal (the shim died during a delete): the state must be what is
# left, since containerd's `shim delete` looks for the state and only for it.
_KILLED_TEARDOWN = """
import os
from kata.config import load_config
from kata.config.load import PACKAGED_CONFIG
from kata.sandbox import sandbox

real = sandbox.remove_tree
def die_after_one(path):
    real(path)
    os._exit(9)
sandbox.remove_tree = die_after_one
sandbox.Sandbox.attach("pod1", load_config(PACKAGED_CONFIG)).destroy()
"""


def test_a_teardown_killed_half_way_leaves_the_state_for_shim_delete(tmp_path: Path) -> None:
    from kata.config.load import PACKAGED_CONFIG

    env, state = _leftover_sandbox(tmp_path, "pod1", {"config": str(PACKAGED_CONFIG), "annotations": {}})
    others = [tmp_path / "vc" / "vm" / "pod1", tmp_path / "shared" / "pod1"]
    for d in others:
        d.mkdir(parents=True)
    killed = subprocess.run([sys.executable, "-c", _KILLED_TEARDOWN], capture_output=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert killed.returncode == 9, killed.stderr
    assert state.exists() and any(d.exists() for d in others)
    proc = _shim_delete(env, "pod1", tmp_path / "bundle")
    assert proc.returncode == 0 and b"cleanup of sandbox" not in proc.stderr, proc.stderr
    assert not state.exists() and not any(d.exists() for d in others)


_FAILED_REMOVAL = """
from kata.config import load_config
from kata.config.load import PACKAGED_CONFIG
from kata.sandbox import sandbox

real = sandbox.remove_tree
def refuse_the_vm_dir(path):
    if path.endswith("/vm/pod1"):
        raise OSError("refused")
    real(path)
sandbox.remove_tree = refuse_the_vm_dir
print(sandbox.Sandbox.attach("pod1", load_config(PACKAGED_CONFIG)).destroy())
"""


def test_a_directory_that_stays_keeps_the_state_that_names_it(tmp_path: Path) -> None:
    from kata.config.load import PACKAGED_CONFIG

    env, state = _leftover_sandbox(tmp_path, "pod1", {"config": str(PACKAGED_CONFIG), "annotations": {}})
    vm_dir, shared = tmp_path / "vc" / "vm" / "pod1", tmp_path / "shared" / "pod1"
    vm_dir.mkdir(parents=True)
    shared.mkdir(parents=True)
    proc = subprocess.run([sys.executable, "-c", _FAILED_REMOVAL], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert proc.returncode == 0, proc.stderr
    assert "refused" in proc.stdout and f"kept {state}" in proc.stdout, proc.stdout
    assert state.exists() and vm_dir.exists() and not shared.exists()
    # The next teardown (containerd's `shim delete`) finds the state and finishes.
    assert _shim_delete(env, "pod1", tmp_path / "bundle").returncode == 0
    assert not state.exists() and not vm_dir.exists()
