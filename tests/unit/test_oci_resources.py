"""kata.oci.resources: `update`'s flags and --resources file, parsed and merged as runc 1.1 does."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from kata.errors import KataError
from kata.oci.resources import (
    ResourcesError,
    add_update_arguments,
    parse_resources_json,
    ram_in_bytes,
    resources_from_args,
)


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_update_arguments(p)
    p.add_argument("container_id")
    return p.parse_args([*argv, "c1"])


def no_stdin() -> str:
    raise AssertionError("stdin must not be read")


def from_flags(*argv: str) -> dict[str, Any]:
    return resources_from_args(parse(*argv), no_stdin)


@pytest.mark.parametrize("size,expected", [
    ("100", 100), ("64m", 64 << 20), ("64M", 64 << 20), ("1g", 1 << 30), ("1GiB", 1 << 30), ("1gb", 1 << 30),
    ("512k", 512 << 10), ("512 KiB", 512 << 10), ("1.5g", 3 << 29), ("2t", 2 << 40), ("1p", 1 << 50),
    ("10b", 10), ("0", 0),
])
def test_ram_in_bytes(size: str, expected: int) -> None:
    assert ram_in_bytes(size) == expected


@pytest.mark.parametrize("size", ["", "abc", "-2", "1x", "1 g b", "1e3", " 1", "1.", "1gg"])
def test_ram_in_bytes_refuses(size: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid size: '.*'$"):
        ram_in_bytes(size)


def test_ram_in_bytes_two_dots() -> None:
    with pytest.raises(ValueError, match=r'^strconv.ParseFloat: parsing "1.2.3": invalid syntax$'):
        ram_in_bytes("1.2.3m")


def test_every_flag() -> None:
    got = from_flags(
        "--blkio-weight", "500", "--cpu-period", "100000", "--cpu-quota", "-1", "--cpu-share", "512",
        "--cpu-rt-period", "1000000", "--cpu-rt-runtime", "950000",
        "--cpuset-cpus", "0-1", "--cpuset-mems", "0",
        "--memory", "256m", "--memory-reservation", "128m", "--memory-swap", "-1", "--pids-limit", "100",
    )
    assert got == {
        "blockIO": {"weight": 500},
        "cpu": {"cpus": "0-1", "mems": "0", "period": 100000, "realtimePeriod": 1000000, "shares": 512,
                "quota": -1, "realtimeRuntime": 950000},
        "memory": {"limit": 256 << 20, "swap": -1, "reservation": 128 << 20},
        "pids": {"limit": 100},
    }


def test_no_flags_ask_for_nothing() -> None:
    assert from_flags() == {}
    assert from_flags("--blkio-weight", "0", "--pids-limit", "0") == {}


@pytest.mark.parametrize("argv,message", [
    (["--cpu-period", "abc"],
     'invalid value for cpu-period: strconv.ParseUint: parsing "abc": invalid syntax'),
    (["--cpu-share", "-1"], 'invalid value for cpu-share: strconv.ParseUint: parsing "-1": invalid syntax'),
    (["--cpu-rt-period", "18446744073709551616"],
     'invalid value for cpu-rt-period: strconv.ParseUint: parsing "18446744073709551616": '
     'value out of range'),
    (["--cpu-quota", "1.5"], 'invalid value for cpu-quota: strconv.ParseInt: parsing "1.5": invalid syntax'),
    (["--cpu-rt-runtime", "9223372036854775808"],
     'invalid value for cpu-rt-runtime: strconv.ParseInt: parsing "9223372036854775808": value out of range'),
    (["--memory", "lots"], "invalid value for memory: invalid size: 'lots'"),
    (["--memory-swap", "-2"], "invalid value for memory-swap: invalid size: '-2'"),
    (["--pids-limit", "x"], 'invalid value "x" for flag -pids-limit: parse error'),
    (["--blkio-weight", "ten"], 'invalid value "ten" for flag -blkio-weight: parse error'),
    (["--blkio-weight", "70000"], 'invalid value "70000" for flag -blkio-weight: value out of range'),
    (["--l3-cache-schema", "L3:0=f"], "Intel RDT/CAT: l3 cache schema is not enabled"),
    (["--mem-bw-schema", "MB:0=70"], "Intel RDT/MBA: memory bandwidth schema is not enabled"),
])
def test_flag_errors_in_runcs_words(argv: list[str], message: str) -> None:
    with pytest.raises(ResourcesError) as err:
        from_flags(*argv)
    assert str(err.value) == message
    assert isinstance(err.value, KataError)


def test_kernel_memory_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kata.oci.resources"):
        assert from_flags("--kernel-memory", "64m", "--kernel-memory-tcp", "1m") == {}
    assert [r.getMessage() for r in caplog.records] == [
        "Setting --kernel-memory is ignored and will be removed",
        "Setting --kernel-memory-tcp is ignored and will be removed",
    ]


def test_resources_file_wins_over_flags(tmp_path: Path) -> None:
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"memory": {"limit": 1 << 30}, "cpu": {"cpus": "1"}}))
    got = resources_from_args(parse("--resources", str(f), "--memory", "64m"), no_stdin)
    assert got == {"memory": {"limit": 1 << 30}, "cpu": {"cpus": "1"}}


def test_resources_from_stdin() -> None:
    got = resources_from_args(parse("-r", "-"), lambda: '{"pids": {"limit": 5}}')
    assert got == {"pids": {"limit": 5}}


def test_resources_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ResourcesError, match=rf"^open {missing}: no such file or directory$"):
        resources_from_args(parse("--resources", str(missing)), no_stdin)


def test_rdt_flags_are_refused_even_with_a_file() -> None:
    with pytest.raises(ResourcesError, match="^Intel RDT/CAT: l3 cache schema is not enabled$"):
        resources_from_args(parse("-r", "-", "--l3-cache-schema", "L3:0=f"), lambda: "{}")


@pytest.mark.parametrize("text,message", [
    ("", "EOF"),
    ("[]", "json: cannot unmarshal array into Go value of type specs.LinuxResources"),
    ('{"memory": 5}', "json: cannot unmarshal number into Go struct field LinuxResources.memory of type "
                      "specs.LinuxMemory"),
    ('{"memory": {"limit": "1g"}}', "json: cannot unmarshal string into Go struct field "
                                    "LinuxMemory.memory.limit of type int64"),
    ('{"cpu": {"shares": -1}}', "json: cannot unmarshal number -1 into Go struct field LinuxCPU.cpu.shares "
                                "of type uint64"),
    ('{"cpu": {"cpus": 3}}', "json: cannot unmarshal number 3 into Go struct field LinuxCPU.cpu.cpus "
                             "of type string"),
    ('{"blockIO": {"weight": 70000}}', "json: cannot unmarshal number 70000 into Go struct field "
                                       "LinuxBlockIO.blockIO.weight of type uint16"),
    ('{"pids": {"limit": true}}', "json: cannot unmarshal bool into Go struct field LinuxPids.pids.limit "
                                  "of type int64"),
])
def test_resources_json_errors(text: str, message: str) -> None:
    with pytest.raises(ResourcesError) as err:
        parse_resources_json(text)
    assert str(err.value) == message


def test_malformed_json() -> None:
    with pytest.raises(ResourcesError, match="^invalid JSON: "):
        parse_resources_json("{memory")


def test_null_fields_are_accepted() -> None:
    assert parse_resources_json('{"memory": null, "cpu": {"shares": null}}') == {"memory": None,
                                                                                 "cpu": {"shares": None}}
