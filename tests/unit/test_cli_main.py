"""The command line loads only the module of the verb it runs, and still parses every verb alike;
refused command lines and invalid ids are one line each."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata.cli.main import _MODULE_OF, _VERB_MODULES, _verb_modules, build_parser, main


@pytest.mark.parametrize("argv,modules", [
    (["--root", "/r", "--log", "l.json", "--log-format", "json", "delete", "--force", "c"], ("lifecycle",)),
    (["--debug", "exec", "--process", "p.json", "c"], ("exec",)),
    (["--root", "state", "state", "c"], ("inspect",)),  # a global option's value is not the verb
    (["--help"], _VERB_MODULES),
    (["bogus"], _VERB_MODULES),
    ([], _VERB_MODULES),
])
def test_the_verb_picks_the_module(argv: list[str], modules: tuple[str, ...]) -> None:
    assert _verb_modules(argv) == modules


def test_every_verb_parses_with_its_module_alone() -> None:
    full = build_parser()
    names = set(full._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert names == set(_MODULE_OF)
    for verb in _MODULE_OF:
        alone = build_parser([verb])
        assert verb in alone._subparsers._group_actions[0].choices  # type: ignore[union-attr]


@pytest.mark.parametrize("argv,message", [
    (["state"], '"state" requires exactly 1 argument(s)'),
    (["kill"], '"kill" requires a minimum of 1 argument(s)'),
    (["--bogus", "state", "c1"], "flag provided but not defined: --bogus"),
    (["delete", "--bogus", "c1"], "flag provided but not defined: --bogus"),
    (["bogus"], "No help topic for 'bogus'"),
])
def test_a_refused_command_line_is_one_line_in_runcs_words(argv: list[str], message: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", "/nonexistent/kata-root", *argv]) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"kata-runtime: {message}\n")


# Every verb that names a container (list names none).
_ID_VERBS = sorted({v for v, m in _MODULE_OF.items() if m in ("lifecycle", "inspect")} - {"list"}
                   | {"exec", "update"})


@pytest.mark.parametrize("verb", _ID_VERBS)
def test_every_verb_checks_its_id_first(verb: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    assert main(["--root", str(root), verb, "../x"]) == 1
    assert capsys.readouterr().err == "kata-runtime: invalid id format: ../x\n"
    assert not root.exists()


@pytest.fixture
def kata_logger() -> Iterator[None]:
    """main() sets up the `kata` logger (a --log file, no propagation): put it back after."""
    logger = logging.getLogger("kata")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    for handler in logger.handlers:
        if handler not in handlers:
            handler.close()
    logger.handlers[:], logger.propagate, logger.level = handlers, propagate, level


@pytest.mark.parametrize("tail,quick", [
    (["delete", "--force", "c1"], True),
    (["delete", "-f", "c1"], True),
    (["--log", "{tmp}/l.json", "--log-format", "json", "--systemd-cgroup", "delete", "--force", "c1"], True),
    (["delete", "c1"], False),  # without --force, a missing container is an error to report
    (["delete", "--force", "../c1"], False),  # an invalid id: the full command line says so
    (["delete", "--force", "--help"], False),  # an option where the id goes
    (["delete", "--force", "-x"], False),
    (["delete", "--force", "c1", "c2"], False),
    (["--log-format", "xml", "delete", "--force", "c1"], False),  # the parser refuses it
    (["--log", "-q", "delete", "--force", "c1"], False),
    (["--log={tmp}/l.json", "delete", "--force", "c1"], False),  # forms the quick path does not parse
    (["--bogus", "delete", "--force", "c1"], False),
    (["kill", "--force", "c1"], False),
])
def test_delete_force_of_nothing_is_answered_before_the_rest_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kata_logger: None, tail: list[str],
        quick: bool) -> None:
    from kata.cli.quick import nothing_to_delete
    from kata.sandbox import paths

    monkeypatch.setattr(paths, "STATE_ROOT", tmp_path / "vc")
    tail = [word.replace("{tmp}", str(tmp_path)) for word in tail]
    root = tmp_path / "root"
    assert nothing_to_delete(["--root", str(root), *tail]) is quick
    if quick:
        # Anything left of the container, the full command line handles it.
        (root / "c1").mkdir(parents=True)  # a create killed before its record (the store removes it)
        assert not nothing_to_delete(["--root", str(root), *tail])
        assert main(["--root", str(root), *tail]) == 0 and not (root / "c1").exists()
        assert nothing_to_delete(["--root", str(root), *tail])
        (tmp_path / "vc" / "sbs" / "c1").mkdir(parents=True)  # a sandbox's state, no record
        assert not nothing_to_delete(["--root", str(root), *tail])
