"""Text from a peer made safe for one line: kata.utils.text, the logfmt formatter, and the messages of
TTRPCError (where a guest's status message enters the host)."""

from __future__ import annotations

import logging
import re

from kata.ttrpc import Code, TTRPCError
from kata.ttrpc.envelope import Status, error_from_status
from kata.utils.logfmt import LogfmtFormatter
from kata.utils.text import MESSAGE_LIMIT, logfmt_value, one_line, printable

HOSTILE = [
    "fine text", "", "two\nlines", "cr\rreturn", "\x1b[2J\x1b[Hcleared", "tab\there", "nul\x00byte",
    "\u202eright-to-left", "line\u2028separator", "lone \udcff surrogate", "\x7f\x85\x9b", "é ü 漢字",
    "x" * 10_000, "\n" * 10_000, "\x1b" * 600, 'quote" and \\ backslash',
]


def test_printable_is_one_bounded_printable_line_and_idempotent() -> None:
    for text in HOSTILE:
        out = printable(text)
        assert out.isprintable() or out == ""
        assert len(out) <= MESSAGE_LIMIT
        assert printable(out) == out  # hop after hop (guest, proxy, CLI) escapes once
    assert printable("fine text") == "fine text"
    assert printable("é ü 漢字") == "é ü 漢字"
    assert printable("two\nlines") == "two\\nlines"
    assert printable("\x1b[2J") == "\\x1b[2J"
    assert printable("\u202e") == "\\u202e"
    assert printable("x" * 600).endswith("...") and len(printable("x" * 600)) == MESSAGE_LIMIT
    assert printable("abc", limit=3) == "abc" and printable("abcd", limit=3) == "..."


def test_one_line_of_an_exception() -> None:
    assert one_line(ValueError("first\nsecond")) == "first"
    assert one_line(ValueError("")) == "ValueError"
    assert one_line(ValueError("\x1b]0;title\x07")) == "\\x1b]0;title\\x07"


def test_logfmt_value_never_leaves_its_quotes() -> None:
    assert logfmt_value('say "hi"\\n') == 'say \\"hi\\"\\\\n'
    quoted = re.compile(r'^(?:[^"\\]|\\.)*$')  # a logfmt quoted value: no bare quote, escapes whole
    for text in [*HOSTILE, 'end with backslash\\', '"' * 5000, "\\" * 5000]:
        value = logfmt_value(text)
        assert value.isprintable() or value == ""
        assert quoted.match(value), value[:80]


def test_logfmt_formatter_keeps_a_forged_message_on_its_line() -> None:
    record = logging.LogRecord("kata.shim", logging.INFO, __file__, 1, "task %s: out of memory", (
        'c1\ntime="2020-01-01" level=error msg="forged"',), None)
    line = LogfmtFormatter().format(record)
    assert "\n" not in line
    assert re.fullmatch(r'time="[0-9T:.-]+Z" level=info msg="(?:[^"\\]|\\.)*"', line), line
    try:
        raise RuntimeError("boom\nagain")
    except RuntimeError:
        import sys

        record = logging.LogRecord("kata.shim", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = LogfmtFormatter().format(record)
    assert "\n" not in line and "Traceback" in line and line.startswith('time="')


def test_ttrpc_errors_carry_one_bounded_line() -> None:
    err = error_from_status(Status(code=int(Code.NOT_FOUND), message="no\nsuch\x1b[31m thing" + "!" * 5000))
    assert err.code == Code.NOT_FOUND
    assert "\n" not in str(err) and "\x1b" not in str(err) and len(err.message) <= MESSAGE_LIMIT
    assert error_from_status(Status(code=999, message="odd")).code == Code.UNKNOWN
    assert TTRPCError(Code.INTERNAL, "plain").message == "plain"


def test_thread_failure_is_one_line() -> None:
    import threading

    from kata.utils.text import thread_failure

    seen: list[str | None] = []
    old = threading.excepthook
    threading.excepthook = lambda args: seen.append(thread_failure(args))
    try:
        for exc in (ValueError("bad\nanswer"), SystemExit(3)):
            def boom(e: BaseException = exc) -> None:
                raise e
            t = threading.Thread(target=boom, name="pump")
            t.start()
            t.join()
    finally:
        threading.excepthook = old
    assert seen == ["pump: bad", None]
