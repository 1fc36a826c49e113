"""The agent's helpers at fixed addresses, containers randomised (kata.guest.agent.layout)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from kata.guest.agent.layout import ADDR_NO_RANDOMIZE, keep_container_randomised


def test_a_spec_without_personality_gets_the_default_one() -> None:
    spec: dict[str, Any] = {"process": {"args": ["true"]}, "linux": {"namespaces": []}}
    assert keep_container_randomised(spec, fixed=True)
    assert spec["linux"] == {"namespaces": [], "personality": {"domain": "LINUX"}}


def test_a_spec_without_linux_gets_one() -> None:
    spec: dict[str, Any] = {"process": {"args": ["true"]}}
    assert keep_container_randomised(spec, fixed=True)
    assert spec["linux"] == {"personality": {"domain": "LINUX"}}


def test_the_specs_own_personality_and_randomised_helpers_leave_it_alone() -> None:
    own = {"domain": "LINUX32", "flags": []}
    spec: dict[str, Any] = {"linux": {"personality": own}}
    assert not keep_container_randomised(spec, fixed=True)
    assert spec["linux"]["personality"] is own
    plain: dict[str, Any] = {"process": {}}
    assert not keep_container_randomised(plain, fixed=False)
    assert plain == {"process": {}}


def test_a_malformed_linux_section_is_left_to_crun() -> None:
    spec: dict[str, Any] = {"linux": "nonsense"}
    assert not keep_container_randomised(spec, fixed=True)
    assert spec == {"linux": "nonsense"}


# In a child interpreter: the personality is the process's own and its children inherit it.
_CHILD = """
import subprocess
from kata.guest.agent import layout
assert not layout.helpers_fixed()
layout.fix_helper_layout()
assert layout.helpers_fixed()
print(subprocess.run(["cat", "/proc/self/personality"], capture_output=True, text=True).stdout.strip())
"""


def test_fixed_layout_is_inherited_by_what_the_agent_starts() -> None:
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout, 16) & ADDR_NO_RANDOMIZE
    # This process (and so the test run) is untouched.
    with open("/proc/self/personality") as f:
        assert not int(f.read(), 16) & ADDR_NO_RANDOMIZE
