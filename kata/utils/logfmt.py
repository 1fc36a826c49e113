"""logrus's text format (``time="..." level=info msg="..."``), which containerd writes and reads: the
runtime's `--log-format text` and the shim's log both use it."""

from __future__ import annotations

import logging
import time

from kata.utils.text import logfmt_value


def timestamp(record: logging.LogRecord) -> str:
    """The record's time as logrus writes it: RFC 3339 in UTC, to the nanosecond."""
    t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{t}.{int(record.msecs * 1e6):09d}Z"


class LogfmtFormatter(logging.Formatter):
    """One line per record, whatever the message holds: a guest's text in a message cannot forge
    further log lines or break out of its quotes. An exception's traceback joins the line, escaped."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return f'time="{timestamp(record)}" level={record.levelname.lower()} msg="{logfmt_value(msg)}"'
