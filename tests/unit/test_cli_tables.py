"""kata.cli.tables: Go tabwriter alignment as runc's `list` prints it, `ps` filtering, RFC3339Nano."""

from __future__ import annotations

import pytest

from kata.cli.tables import filter_ps_output, format_table, list_table, print_table, rfc3339nano, tabwrite


def test_short_cells_pad_to_the_minimum_width() -> None:
    # What `runc list` prints with no containers.
    assert format_table(("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"), []) == \
        "ID          PID         STATUS      BUNDLE      CREATED     OWNER\n"


def test_list_table() -> None:
    containers = [
        {"ociVersion": "1.0.2", "id": "web", "pid": 1234, "status": "running", "bundle": "/run/b/web",
         "rootfs": "/run/b/web/rootfs", "created": "2024-01-02T03:04:05.123456789Z", "owner": "root"},
        {"id": "a-much-longer-id", "pid": 0, "status": "stopped", "bundle": "/b", "created":
         "2024-01-02T03:04:05Z", "owner": "#1000"},
    ]
    assert list_table(containers).split("\n") == [
        "ID                 PID         STATUS      BUNDLE       CREATED                          OWNER",
        "web                1234        running     /run/b/web   2024-01-02T03:04:05.123456789Z   root",
        "a-much-longer-id   0           stopped     /b           2024-01-02T03:04:05Z             #1000",
        "",
    ]


def test_column_blocks_follow_go() -> None:
    # A line with fewer cells ends the block: the lines after it are aligned on their own.
    text = "a\tb\tc\nlonger-than-twelve\tx\ny\nq\tr\n"
    assert tabwrite(text) == (
        "a".ljust(18 + 3) + "b".ljust(12) + "c\n"
        + "longer-than-twelve".ljust(18 + 3) + "x\n"
        + "y\n"
        + "q".ljust(12) + "r\n"
    )


def test_trailing_text_without_newline_is_kept() -> None:
    assert tabwrite("a\tb") == "a           b"
    assert tabwrite("") == ""


PS = """UID          PID    PPID  C STIME TTY          TIME CMD
root           1       0  0 10:00 ?        00:00:01 /sbin/init
root         812       1  0 10:00 ?        00:00:00 sleep 100
root         900     812  0 10:01 ?        00:00:00 sh
"""


def test_ps_keeps_the_header_and_the_containers_pids() -> None:
    assert filter_ps_output(PS, {812, 900, 5}).split("\n") == [
        PS.split("\n")[0], PS.split("\n")[2], PS.split("\n")[3], ""]
    assert filter_ps_output(PS, set()) == PS.split("\n")[0] + "\n"


def test_ps_errors_in_runcs_words() -> None:
    with pytest.raises(ValueError, match="^couldn't find PID field in ps output$"):
        filter_ps_output("UID CMD\nroot init\n", {1})
    with pytest.raises(ValueError, match=r'^unable to parse pid: strconv.Atoi: parsing "x": invalid syntax$'):
        filter_ps_output("PID CMD\nx init\n", {1})


@pytest.mark.parametrize("ns,expected", [
    (1_704_164_645_123_456_789, "2024-01-02T03:04:05.123456789Z"),
    (1_704_164_645_120_000_000, "2024-01-02T03:04:05.12Z"),
    (1_704_164_645_000_000_000, "2024-01-02T03:04:05Z"),
    (1_704_164_645_000_000_001, "2024-01-02T03:04:05.000000001Z"),
])
def test_rfc3339nano(ns: int, expected: str) -> None:
    assert rfc3339nano(ns) == expected


def test_print_table_writes_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    print_table(["ID", "PID"], [["c1", 7]])
    assert capsys.readouterr().out == "ID          PID\nc1          7\n"
