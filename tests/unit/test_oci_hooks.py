"""kata.oci.hooks: real little hooks (shell scripts in a temp dir) run as runc runs them."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from kata.errors import KataError
from kata.oci.hooks import HookError, run_hooks, state_for_hooks


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def spec_with(kind: str, *hooks: dict[str, Any]) -> dict[str, Any]:
    return {"ociVersion": "1.0.2", "hooks": {kind: list(hooks)}}


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    b = tmp_path / "bundle"
    b.mkdir()
    return b


def state(bundle: Path, status: str = "creating") -> dict[str, Any]:
    return state_for_hooks("c1", status, str(bundle), pid=4242, annotations={"a": "b"})


def test_hooks_run_in_order(tmp_path: Path, bundle: Path) -> None:
    log = tmp_path / "order"
    hooks = [{"path": script(tmp_path, f"h{i}", f"echo {i} >> {log}")} for i in range(3)]
    run_hooks(spec_with("prestart", *hooks), "prestart", state(bundle))
    assert log.read_text().split() == ["0", "1", "2"]


def test_state_is_on_stdin(tmp_path: Path, bundle: Path) -> None:
    out = tmp_path / "stdin"
    hook = {"path": script(tmp_path, "h", f"cat > {out}")}
    run_hooks(spec_with("createRuntime", hook), "createRuntime", state(bundle))
    assert json.loads(out.read_text()) == {
        "ociVersion": "1.0.2", "id": "c1", "status": "creating", "pid": 4242,
        "bundle": str(bundle), "annotations": {"a": "b"},
    }


def test_state_omits_empty_pid_and_annotations(bundle: Path) -> None:
    s = state_for_hooks("c1", "stopped", str(bundle), pid=0, annotations={})
    assert s == {"ociVersion": "1.0.2", "id": "c1", "status": "stopped", "bundle": str(bundle)}
    assert list(state(bundle)) == ["ociVersion", "id", "status", "pid", "bundle", "annotations"]


def test_env_is_exactly_the_hooks(tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KATA_TEST_LEAK", "1")
    out = tmp_path / "env"
    hook = {"path": script(tmp_path, "h", f"/usr/bin/env > {out}"), "env": ["A=1", "B=x=y", "A=2"]}
    run_hooks(spec_with("prestart", hook), "prestart", state(bundle))
    lines = set(out.read_text().split())
    assert {"A=2", "B=x=y"} <= lines
    assert not any(line.startswith("KATA_TEST_LEAK=") for line in lines)
    assert not any(line.startswith("A=1") for line in lines)


def test_empty_env_list_means_empty_environment(tmp_path: Path, bundle: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KATA_TEST_LEAK", "1")
    out = tmp_path / "env"
    hook = {"path": "/bin/sh", "args": ["sh", "-c", f"/usr/bin/env > {out}"], "env": []}
    run_hooks(spec_with("prestart", hook), "prestart", state(bundle))
    assert "KATA_TEST_LEAK" not in out.read_text()


def test_without_env_the_runtimes_environment_is_inherited(tmp_path: Path, bundle: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Go's exec.Cmd with a nil Env, which is what runc passes for a hook without "env".
    monkeypatch.setenv("KATA_TEST_INHERITED", "yes")
    out = tmp_path / "env"
    run_hooks(spec_with("poststop", {"path": script(tmp_path, "h", f"/usr/bin/env > {out}")}),
              "poststop", state(bundle, "stopped"))
    assert "KATA_TEST_INHERITED=yes" in out.read_text().split()


def test_args_zero_is_argv_zero(tmp_path: Path, bundle: Path) -> None:
    out = tmp_path / "argv"
    # /proc/$$/cmdline is the shell's own argv, argv[0] included.
    cmd = f"tr '\\0' '\\n' < /proc/$$/cmdline > {out}"
    hook = {"path": "/bin/sh", "args": ["libnetwork-setkey", "-c", cmd, "x", "y"]}
    run_hooks(spec_with("prestart", hook), "prestart", state(bundle))
    assert out.read_text().split("\n")[:5] == ["libnetwork-setkey", "-c", cmd, "x", "y"]


def test_without_args_argv_is_the_path(tmp_path: Path, bundle: Path) -> None:
    out = tmp_path / "argc"
    path = script(tmp_path, "h", f'echo "$#" > {out}')
    run_hooks(spec_with("poststart", {"path": path}), "poststart", state(bundle, "running"))
    assert out.read_text().strip() == "0"


def test_cwd_is_the_bundle(tmp_path: Path, bundle: Path) -> None:
    out = tmp_path / "cwd"
    hook = {"path": script(tmp_path, "h", f"pwd > {out}")}
    run_hooks(spec_with("prestart", hook), "prestart", state(bundle))
    assert out.read_text().strip() == str(bundle)


def test_failure_is_worded_like_runc_and_stops_the_kind(tmp_path: Path, bundle: Path) -> None:
    ran = tmp_path / "ran"
    hooks = [
        {"path": script(tmp_path, "ok", "true")},
        {"path": script(tmp_path, "bad", "echo out; echo err >&2; exit 3")},
        {"path": script(tmp_path, "after", f"touch {ran}")},
    ]
    with pytest.raises(HookError) as err:
        run_hooks(spec_with("createRuntime", *hooks), "createRuntime", state(bundle))
    assert str(err.value) == \
        "error running createRuntime hook #1: exit status 3, stdout: out\n, stderr: err\n"
    assert isinstance(err.value, KataError)
    assert not ran.exists()


def test_death_by_signal(tmp_path: Path, bundle: Path) -> None:
    hook = {"path": script(tmp_path, "h", "kill -TERM $$")}
    with pytest.raises(HookError, match=r"^error running prestart hook #0: signal: terminated, stdout: , "
                                        r"stderr: $"):
        run_hooks(spec_with("prestart", hook), "prestart", state(bundle))


def test_timeout_kills_the_hook(tmp_path: Path, bundle: Path) -> None:
    hook = {"path": script(tmp_path, "h", "exec sleep 30"), "timeout": 1}
    start = time.monotonic()
    with pytest.raises(HookError) as err:
        run_hooks(spec_with("startContainer", hook), "startContainer", state(bundle, "created"))
    assert time.monotonic() - start < 5
    assert str(err.value) == "error running startContainer hook #0: hook ran past specified timeout of 1.0s"


def test_a_hook_within_its_timeout_succeeds(tmp_path: Path, bundle: Path) -> None:
    run_hooks(spec_with("prestart", {"path": script(tmp_path, "h", "true"), "timeout": 10}),
              "prestart", state(bundle))


def test_missing_path(bundle: Path) -> None:
    with pytest.raises(HookError) as err:
        run_hooks(spec_with("prestart", {"path": "/nonexistent/hook"}), "prestart", state(bundle))
    assert str(err.value) == \
        "error running prestart hook #0: fork/exec /nonexistent/hook: no such file or directory"


def test_not_executable(tmp_path: Path, bundle: Path) -> None:
    path = tmp_path / "plain"
    path.write_text("#!/bin/sh\n")
    with pytest.raises(HookError, match=r"^error running prestart hook #0: fork/exec .*: permission denied$"):
        run_hooks(spec_with("prestart", {"path": str(path)}), "prestart", state(bundle))


def test_non_fatal_kinds_warn_and_continue(tmp_path: Path, bundle: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    ran = tmp_path / "ran"
    hooks = [{"path": script(tmp_path, "bad", "exit 1")}, {"path": script(tmp_path, "ok", f"touch {ran}")}]
    with caplog.at_level(logging.WARNING, logger="kata.oci.hooks"):
        run_hooks(spec_with("poststop", *hooks), "poststop", state(bundle, "stopped"), fatal=False)
    assert ran.exists()
    assert [r.getMessage() for r in caplog.records] == [
        "error running poststop hook #0: exit status 1, stdout: , stderr: "]


def test_non_fatal_uses_the_given_logger(bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("kata.test.hooks")
    with caplog.at_level(logging.WARNING, logger="kata.test.hooks"):
        run_hooks(spec_with("poststart", {"path": "/nonexistent"}), "poststart", state(bundle, "running"),
                  fatal=False, log=logger)
    assert [r.name for r in caplog.records] == ["kata.test.hooks"]


def test_a_hook_that_ignores_a_large_stdin(tmp_path: Path, bundle: Path) -> None:
    s = state_for_hooks("c1", "creating", str(bundle), annotations={f"k{i}": "v" * 100 for i in range(2000)})
    run_hooks(spec_with("prestart", {"path": script(tmp_path, "h", "exit 0")}), "prestart", s)


def test_a_vanished_bundle_does_not_stop_poststop(tmp_path: Path) -> None:
    out = tmp_path / "ran"
    s = state_for_hooks("c1", "stopped", str(tmp_path / "gone"))
    run_hooks(spec_with("poststop", {"path": script(tmp_path, "h", f"touch {out}")}), "poststop", s)
    assert out.exists()


def test_no_hooks_and_unknown_kinds(bundle: Path) -> None:
    run_hooks({}, "prestart", state(bundle))
    run_hooks({"hooks": None}, "poststop", state(bundle))
    with pytest.raises(ValueError):
        run_hooks({}, "prestop", state(bundle))
