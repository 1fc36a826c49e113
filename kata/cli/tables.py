"""runc's human-readable output: tab-aligned tables (`list`), `ps` filtering, and timestamps.

runc aligns with Go's text/tabwriter.NewWriter(out, 12, 1, 3, ' ', 0): a tab-terminated cell is padded
with spaces to its column's width, which is the widest cell of the column's block plus 3, but at
least 12; a line's last cell (after its last tab) is written as is.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

LIST_HEADER = ("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")


def tabwrite(text: str, minwidth: int = 12, padding: int = 3, padchar: str = " ") -> str:
    """Go's tabwriter (left-aligned, no flags) applied to ``text``, as one Flush would write it."""
    lines = [line.split("\t") for line in text.split("\n")]
    out: list[str] = []
    _format(lines, 0, len(lines), [], minwidth, padding, padchar, out)
    return "\n".join(out)


def _format(lines: list[list[str]], line0: int, line1: int, widths: list[int], minwidth: int,
            padding: int, padchar: str, out: list[str]) -> None:
    """tabwriter's recursive column-block pass: a block is a run of lines that have a cell in the column."""
    column = len(widths)
    this = line0
    while this < line1:
        if column >= len(lines[this]) - 1:  # the last cell of a line belongs to no column
            this += 1
            continue
        _write(lines, line0, this, widths, padchar, out)
        line0 = this
        width = minwidth
        while this < line1 and column < len(lines[this]) - 1:
            width = max(width, len(lines[this][column]) + padding)
            this += 1
        _format(lines, line0, this, [*widths, width], minwidth, padding, padchar, out)
        line0 = this
    _write(lines, line0, line1, widths, padchar, out)


def _write(lines: list[list[str]], line0: int, line1: int, widths: list[int], padchar: str,
           out: list[str]) -> None:
    for cells in lines[line0:line1]:
        out.append("".join(
            cell + padchar * (widths[j] - len(cell)) if j < len(widths) else cell
            for j, cell in enumerate(cells)
        ))


def format_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A runc-style table: header and rows, tab-separated, aligned; ends with a newline."""
    text = "".join("\t".join(str(c) for c in row) + "\n" for row in [header, *rows])
    return tabwrite(text)


def print_table(header: Sequence[str], rows: Iterable[Sequence[object]], file: TextIO | None = None) -> None:
    """Write format_table(header, rows) to ``file`` (stdout), as runc's tabwriter.Flush does."""
    (file or sys.stdout).write(format_table(header, rows))


def list_table(containers: Iterable[Mapping[str, Any]]) -> str:
    """`runc list` (table format) from runc's containerState dicts (`runc list --format json` items)."""
    return format_table(LIST_HEADER, (
        (c["id"], c.get("pid", 0), c["status"], c.get("bundle", ""), c.get("created", ""), c.get("owner", ""))
        for c in containers
    ))


def filter_ps_output(output: str, pids: Collection[int]) -> str:
    """`runc ps` (table format): the header of ``output`` (from ps(1)) and the lines whose PID is in
    ``pids``. ValueError in runc's words when the header has no PID column or a PID is not a number."""
    lines = output.split("\n")
    titles = lines[0].split()
    if "PID" not in titles:
        raise ValueError("couldn't find PID field in ps output")
    index = titles.index("PID")
    kept = [lines[0]]
    for line in lines[1:]:
        if not line:
            continue
        field = line.split()[index]
        if not field.isascii() or not field.isdigit():
            raise ValueError(f'unable to parse pid: strconv.Atoi: parsing "{field}": invalid syntax')
        if int(field) in pids:
            kept.append(line)
    return "".join(line + "\n" for line in kept)


def rfc3339nano(epoch_ns: int) -> str:
    """Go's time.Time.Format(time.RFC3339Nano) in UTC, the `created` of `runc state` and `runc list`:
    nanoseconds with trailing zeros dropped (and no dot at all for a whole second), then "Z"."""
    seconds, nanos = divmod(epoch_ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{nanos:09d}".rstrip("0")
    return f"{stamp}.{fraction}Z" if fraction else f"{stamp}Z"
