"""kata.cli.tables: Go tabwriter alignment as runc's `list` prints it, `ps` filtering, RFC3339Nano."""

from __future__ import annotations

from kata.cli.tables import format_table, list_table, tabwrite


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
