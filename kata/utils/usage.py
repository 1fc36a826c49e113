"""argparse for our commands (kata-runtime, containerd-shim-kata-v2): a refused command line is an
exception with one line in the words of the Go programs they stand in for, where those have words
(Go's flag package, runc's urfave/cli); argparse would print its usage and exit 2. The command prints
it as it prints every other error, and in-process callers get no SystemExit."""

from __future__ import annotations

import argparse
from typing import NoReturn

from kata.errors import KataError


class UsageError(KataError):
    """A command line the parser refuses (an unknown flag, a missing argument...)."""


class Parser(argparse.ArgumentParser):
    """Sub-parsers (add_subparsers) are of this class too."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self._go_words(message))

    def _go_words(self, message: str) -> str:
        if message.startswith("unrecognized arguments: "):
            first = message.split(": ", 1)[1].split(" ", 1)[0]
            if first.startswith("-"):
                return f"flag provided but not defined: {first}"
        elif message.startswith("argument COMMAND: invalid choice: "):
            return f"No help topic for {message.split(': ')[2].split(' ')[0]}"
        elif message.startswith("the following arguments are required: ") and " " in self.prog:
            # A verb's parser ("PROG VERB"); some verbs take more words after their first.
            more = any(a.nargs in (argparse.REMAINDER, "?") for a in self._actions if not a.option_strings)
            verb = self.prog.split()[-1]
            return f'"{verb}" requires {"a minimum of" if more else "exactly"} 1 argument(s)'
        return message
