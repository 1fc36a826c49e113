"""The configuration a CRI-enabled test containerd gets: every path under its directory, runc plus the
handlers given, and a TOML file containerd can read (plugin names are quoted keys)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from kata.config.toml_out import dumps
from tests.support.cri_config import CRI_PLUGIN, KATA, cni_bridge_name, cni_conflist, cri_plugin_config
from tests.support.daemons import Containerd, DaemonError
from tests.support.images import PAUSE_REF


def test_toml_quotes_keys_that_are_not_bare() -> None:
    data = {"version": 2, "plugins": {"io.containerd.grpc.v1.cri": {"cni": {"bin_dir": "/x"}}}}
    text = dumps(data)
    assert '[plugins."io.containerd.grpc.v1.cri".cni]' in text
    assert tomllib.loads(text) == data


def test_containerd_config_with_cri(tmp_path: Path) -> None:
    daemon = Containerd(cri=True, runtimes={"kata": KATA})
    daemon._base = base = tmp_path / "ktc-ab12cd34"  # as start() would make it
    config = tomllib.loads(dumps(daemon.config()))
    assert config["disabled_plugins"] == []
    cri = config["plugins"][CRI_PLUGIN]
    assert cri["sandbox_image"] == PAUSE_REF and cri["netns_mounts_under_state_dir"] is True
    assert cri["cni"]["conf_dir"] == str(base / "cni")
    handlers = cri["containerd"]["runtimes"]
    assert handlers["runc"]["runtime_type"] == "io.containerd.runc.v2"
    assert handlers["runc"]["options"] == {"Root": str(base / "runc")}
    assert handlers["kata"]["runtime_type"] == "io.containerd.kata.v2"
    assert handlers["kata"]["pod_annotations"] == ["io.katacontainers.*"]
    assert "options" not in handlers["kata"]


def test_containerd_config_without_cri(tmp_path: Path) -> None:
    daemon = Containerd()
    daemon._base = tmp_path / "ktc-ab12cd34"
    config = tomllib.loads(dumps(daemon.config()))
    assert config["disabled_plugins"] == [CRI_PLUGIN] and CRI_PLUGIN not in config["plugins"]
    assert config["grpc"]["address"] == str(daemon.socket)
    with pytest.raises(DaemonError):
        Containerd(runtimes={"kata": KATA})


def test_cni_network_stays_under_the_directory() -> None:
    base = Path("/run/ktc-ab_2cd34")
    conflist = cni_conflist(base, "10.88.7.0/24")
    [bridge] = conflist["plugins"]
    assert bridge["bridge"] == cni_bridge_name(base) == "cni-ab_2cd34" and len(bridge["bridge"]) <= 15
    assert bridge["ipam"]["dataDir"].startswith(str(base))
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.88.7.0/24"}]]
    assert conflist["name"] == base.name
    # a handler given under the name "runc" replaces the default one
    assert cri_plugin_config(base, {"runc": KATA})["containerd"]["runtimes"]["runc"] == {
        "runtime_type": KATA.runtime_type, "pod_annotations": list(KATA.pod_annotations),
        "container_annotations": []}
