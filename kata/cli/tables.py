"""runc's human-readable output: tab-aligned tables (`list`).

runc aligns with Go's text/tabwriter.NewWriter(out, 12, 1, 3, ' ', 0): a tab-terminated cell is padded
with spaces to its column's width, which is the widest cell of the column's block plus 3, but at
least 12; a line's last cell (after its last tab) is written as is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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


def list_table(containers: Iterable[Mapping[str, Any]]) -> str:
    """`runc list` (table format) from runc's containerState dicts (`runc list --format json` items)."""
    return format_table(LIST_HEADER, (
        (c["id"], c.get("pid", 0), c["status"], c.get("bundle", ""), c.get("created", ""), c.get("owner", ""))
        for c in containers
    ))
