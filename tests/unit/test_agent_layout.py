"""The agent's helpers at fixed addresses, containers randomised (kata.guest.agent.layout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kata.guest.agent.layout import ADDR_NO_RANDOMIZE, keep_container_randomised

DEFAULT = {"domain": "LINUX"}


def test_a_spec_without_personality_gets_the_default_one() -> None:
    spec: dict[str, Any] = {"process": {"args": ["true"]}, "linux": {"namespaces": []}}
    keep_container_randomised(spec)
    assert spec["linux"] == {"namespaces": [], "personality": DEFAULT}


@pytest.mark.parametrize("linux", [{}, {"linux": None}, {"linux": "nonsense"}, {"linux": 3}],
                         ids=["absent", "null", "string", "number"])
def test_a_spec_without_a_linux_object_gets_one(linux: dict[str, Any]) -> None:
    spec: dict[str, Any] = {"process": {"args": ["true"]}, **linux}
    keep_container_randomised(spec)
    assert spec["linux"] == {"personality": DEFAULT}


@pytest.mark.parametrize("own", [None, "LINUX32", [], {}, {"domain": None}, {"flags": []}])
def test_a_personality_crun_would_skip_becomes_the_default(own: object) -> None:
    # crun's parser reads a null or a non-object as no personality, and would then set none.
    spec: dict[str, Any] = {"linux": {"personality": own}}
    keep_container_randomised(spec)
    assert spec["linux"]["personality"] == DEFAULT


def test_the_specs_own_personality_is_kept() -> None:
    own = {"domain": "LINUX32", "flags": ["ADDR_NO_RANDOMIZE"]}
    spec: dict[str, Any] = {"linux": {"personality": own}}
    keep_container_randomised(spec)
    assert spec["linux"]["personality"] is own


# crun as the agent runs it, standing in: it keeps the bundle's config.json and fails.
_CRUN = """#!/bin/sh
while [ $# -gt 0 ]; do
  [ "$1" = --bundle ] && cp "$2/config.json" "{seen}"
  shift
done
echo '{{"msg": "stand-in"}}' >&2
exit 1
"""


# The agent's create_container with crun standing in, in a child interpreter (the agent's reaper
# collects every child of its process): the stand-in keeps the bundle's config.json and fails.
_CRUN = """#!/bin/sh
while [ $# -gt 0 ]; do
  [ "$1" = --bundle ] && cp "$2/config.json" "$SEEN"
  shift
done
exit 1
"""
_CREATE = """
import sys
from kata.guest.agent import sandbox
from kata.guest.agent.crun import Crun
from kata.guest.agent.reaper import Reaper
sandbox.helpers_fixed = lambda: sys.argv[1] == "fixed"
reaper = Reaper()
reaper.start()
box = sandbox.Sandbox(reaper, Crun(reaper, binary=sys.argv[2], root=sys.argv[3] + "/root"),
                      run_dir=sys.argv[3] + "/run")
try:
    box.create_container("c1", b'{"process": {"args": ["true"]}, "linux": {"personality": null}}')
except Exception as exc:
    print(type(exc).__name__)
"""


@pytest.mark.parametrize("fixed", [True, False])
def test_create_container_writes_the_personality_only_with_fixed_helpers(tmp_path: Path, fixed: bool) -> None:
    crun = tmp_path / "crun"
    crun.write_text(_CRUN)
    crun.chmod(0o755)
    seen = tmp_path / "seen.json"
    argv = [sys.executable, "-c", _CREATE, "fixed" if fixed else "random", str(crun), str(tmp_path)]
    env = {**os.environ, "SEEN": str(seen)}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "CrunError", out.stdout + out.stderr
    written = json.loads(seen.read_text())
    assert written["linux"]["personality"] == (DEFAULT if fixed else None)


# In a child interpreter: the personality is the process's own and its children inherit it.
_CHILD = """
import subprocess
from kata.guest.agent import layout
layout.fix_helper_layout()
assert layout.helpers_fixed()
print(subprocess.run(["cat", "/proc/self/personality"], capture_output=True, text=True).stdout.strip())
"""


def test_fixed_layout_is_inherited_by_what_the_agent_starts() -> None:
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout, 16) & ADDR_NO_RANDOMIZE
