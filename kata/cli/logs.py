"""Runtime logging in runc's shape: text or JSON lines ({"level","msg","time"}) to --log or stderr.

containerd's runc shim shows the user the last "error" line of log.json when a command fails,
so errors always go to the log file as well as to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import TextIO

from kata.utils.logfmt import LogfmtFormatter, timestamp

LOGGER_NAME = "kata"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"level": record.levelname.lower(), "msg": record.getMessage(), "time": timestamp(record)}
        return json.dumps(line)


def setup(log_path: str | None, log_format: str, debug: bool) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    stream: TextIO
    if log_path:
        stream = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
        handler: logging.Handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter() if log_format == "json" else LogfmtFormatter())
        logger.addHandler(handler)
    else:
        # Without a log file, warnings (e.g. the one-time fall-back to TCG) still reach the user.
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.DEBUG if debug else logging.WARNING)
        # Errors are printed once, as the command's one-line message (see main).
        handler.addFilter(lambda record: record.levelno < logging.ERROR)
        handler.setFormatter(JsonFormatter() if log_format == "json" else LogfmtFormatter())
        logger.addHandler(handler)
    return logger


def get() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
