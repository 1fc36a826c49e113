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
