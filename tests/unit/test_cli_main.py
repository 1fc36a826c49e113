"""The command line loads only the module of the verb it runs, and still parses every verb alike."""

from __future__ import annotations

import pytest

from kata.cli.main import _MODULE_OF, _VERB_MODULES, _verb_modules, build_parser


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
