"""kata.utils.signals: `kill`'s signal argument parsed as runc 1.1 parses it."""

from __future__ import annotations

import signal

import pytest

from kata.utils.signals import SIGNAL_NUMBERS, describe_signal, parse_signal


@pytest.mark.parametrize("raw", ["KILL", "SIGKILL", "sigkill", "kill", "SigKill", "9", "+9", "09"])
def test_kill_in_every_spelling(raw: str) -> None:
    assert parse_signal(raw) == signal.SIGKILL


@pytest.mark.parametrize("raw,num", [("TERM", 15), ("hup", 1), ("SIGWINCH", 28), ("usr1", 10), ("0", 0),
                                     ("64", 64), ("SIGSTKFLT", 16), ("PWR", 30)])
def test_names_and_numbers(raw: str, num: int) -> None:
    assert parse_signal(raw) == num


@pytest.mark.parametrize("raw", ["FOO", "SIGFOO", "", "SIG", "RTMIN", "SIGRTMIN+1", "IOT", " 9", "9 ", "1_0",
                                 "-1", "65", "0x9", "KILL\n"])
def test_unknown_signals_get_runcs_message(raw: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_signal(raw)
    assert str(err.value).startswith("unknown signal \"")


def test_message_quotes_what_the_user_typed() -> None:
    with pytest.raises(ValueError, match=r'^unknown signal "foo"$'):
        parse_signal("foo")


def test_table_matches_the_hosts_numbers() -> None:
    # x/sys/unix's table is Linux's numbering, so it must agree with Python's.
    for name, num in SIGNAL_NUMBERS.items():
        assert getattr(signal, name) == num
    assert len(SIGNAL_NUMBERS) == 31


def test_descriptions() -> None:
    assert describe_signal(9) == "killed"
    assert describe_signal(15) == "terminated"
    assert describe_signal(40) == "signal 40"
