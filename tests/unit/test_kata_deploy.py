"""deploy/kata_deploy.py against a temporary host root: containerd's config.toml gets kata beside runc
(install twice changes nothing; uninstall gives back the file byte for byte), the payload's files come
and go with a manifest, and the node is labelled through the API server."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# Debian 12's containerd package's /etc/containerd/config.toml
DEBIAN_CONFIG = """version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""
CRI = 'plugins."io.containerd.grpc.v1.cri".containerd'


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kata_deploy", DEPLOY / "kata_deploy.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["kata_deploy"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


kd = _load()


def runtimes(text: str) -> dict[str, Any]:
    return dict(tomllib.loads(text)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"])


def default_runtime(text: str) -> str:
    return str(kd.default_runtime(tomllib.loads(text)))


@pytest.fixture
def host(tmp_path: Path) -> dict[str, Path]:
    """A host root with Debian's config.toml, python3, QEMU and virtiofsd, and a payload like the image's."""
    root, payload = tmp_path / "host", tmp_path / "payload"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(DEBIAN_CONFIG)
    for tool in ("usr/bin/python3", "usr/bin/python3.11", "usr/bin/qemu-system-x86_64",
                 "usr/lib/qemu/virtiofsd"):
        (root / tool).parent.mkdir(parents=True, exist_ok=True)
        (root / tool).touch()
    (root / "usr/local/bin").mkdir(parents=True)  # the host's: must stay
    venv = payload / "opt/kata-containers/venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/containerd-shim-kata-v2").write_text("#!/opt/kata-containers/venv/bin/python\n")
    (venv / "bin/python3").symlink_to("/usr/bin/python3")
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\nversion = 3.11.2\n")
    (payload / "usr/local/bin").mkdir(parents=True)
    (payload / "usr/local/bin/containerd-shim-kata-v2").symlink_to(
        "/opt/kata-containers/venv/bin/containerd-shim-kata-v2")
    conf = payload / "usr/share/defaults/kata-containers/configuration.toml"
    conf.parent.mkdir(parents=True)
    shutil.copy(DEPLOY.parent / "kata/config/configuration-qemu.toml", conf)
    return {"root": root, "payload": payload, "restarts": tmp_path / "restarts"}


def run(host: dict[str, Path], command: str, *extra: str) -> int:
    return int(kd.main([command, "--host-root", str(host["root"]), "--payload", str(host["payload"]),
                        "--restart-cmd", f"sh -c 'echo restart >> {host['restarts']}'", "--cleanup-cmd", "",
                        "--start-cmd", f"sh -c 'echo start >> {host['restarts']}.start'",
                        "--node", "", *extra]))


def restarts(host: dict[str, Path]) -> int:
    return len(host["restarts"].read_text().splitlines()) if host["restarts"].exists() else 0


def test_install_twice_then_uninstall_restores_the_host(host: dict[str, Path]) -> None:
    root, config = host["root"], host["root"] / "etc/containerd/config.toml"
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert run(host, "install") == 0
    installed = config.read_text()
    assert installed.startswith(DEBIAN_CONFIG)
    # kata beside runc (named again: naming any runtime drops containerd's built-in runc), runc the default
    assert runtimes(installed)["kata"] == {
        "runtime_type": "io.containerd.kata.v2", "privileged_without_host_devices": True,
        "pod_annotations": ["io.katacontainers.*"],
        "options": {"ConfigPath": "/usr/share/defaults/kata-containers/configuration.toml"}}
    assert runtimes(installed)["runc"] == {"runtime_type": "io.containerd.runc.v2"}
    assert default_runtime(installed) == "runc"
    assert (root / "opt/kata-containers/venv/bin/containerd-shim-kata-v2").is_file()
    link = (root / "usr/local/bin/containerd-shim-kata-v2").readlink()
    assert link == Path("/opt/kata-containers/venv/bin/containerd-shim-kata-v2")
    assert restarts(host) == 1
    # The templates and the warm pool are started on the host after each install.
    assert Path(f"{host['restarts']}.start").read_text() == "start\n"

    assert run(host, "install") == 0
    assert config.read_text() == installed
    assert restarts(host) == 1  # nothing changed, so containerd keeps running
    assert run(host, "status") == 0

    assert run(host, "uninstall") == 0
    assert config.read_text() == DEBIAN_CONFIG
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before
    assert restarts(host) == 2
    assert run(host, "uninstall") == 0 and restarts(host) == 2
    assert run(host, "status") == 1


@pytest.mark.parametrize("original", [
    # the file names its own runc: not named twice, and its options stay
    'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
    '  runtime_type = "io.containerd.runc.v2"\n'
    '  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]\n    SystemdCgroup = true',
    # another default runtime is left as it is; no newline at the end comes back as it was
    'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  default_runtime_name = "crun"\n'
    f'[{CRI}.runtimes.crun]\n  runtime_type = "io.containerd.runc.v2"',
    # an empty file gets the version it needs
    "",
    "# only a comment\n",
])
def test_the_block_keeps_the_default_runtime(original: str) -> None:
    installed = kd.with_block(original)
    assert kd.with_block(installed) == installed
    assert kd.without_block(installed) == original
    before = tomllib.loads(original)
    assert default_runtime(installed) == kd.default_runtime(before)
    assert runtimes(installed)["kata"]["runtime_type"] == "io.containerd.kata.v2"
    for name, table in kd._runtimes(before).items():
        assert runtimes(installed)[name] == table
    assert tomllib.loads(installed)["version"] == 2


@pytest.mark.parametrize("original, error", [
    ('[plugins.cri]\n  sandbox_image = "x"\n', "only version 2"),  # version 1
    ('version = 3\n', "only version 2"),
    (f'version = 2\n[{CRI}.runtimes.kata]\n  runtime_type = "io.containerd.kata.v2"\n', "already defines"),
    ("version = 2\n[plugins\n", "not valid TOML"),
    ("version = 2\n\n# BEGIN kata-deploy: cut short\n", "without"),
])
def test_configs_it_will_not_edit(original: str, error: str) -> None:
    with pytest.raises(kd.DeployError, match=error):
        kd.with_block(original)


def test_a_missing_config_is_created_and_removed_again(host: dict[str, Path]) -> None:
    config = host["root"] / "etc/containerd/config.toml"
    config.unlink()
    assert run(host, "install") == 0
    assert default_runtime(config.read_text()) == "runc"
    assert run(host, "uninstall") == 0
    assert not config.exists()


def test_refusals_leave_the_host_alone(host: dict[str, Path]) -> None:
    root, config = host["root"], host["root"] / "etc/containerd/config.toml"
    (root / "usr/bin/qemu-system-x86_64").unlink()
    assert run(host, "install") == 1  # the host lacks QEMU
    (root / "usr/bin/qemu-system-x86_64").touch()
    (root / "usr/local/bin/containerd-shim-kata-v2").write_text("a manual install's\n")
    assert run(host, "install") == 1  # a file kata-deploy did not put there
    assert config.read_text() == DEBIAN_CONFIG and not (root / "opt").exists()
    assert run(host, "install", "--force") == 0
    assert run(host, "uninstall") == 0


def test_a_failed_restart_puts_the_config_back(host: dict[str, Path]) -> None:
    config = host["root"] / "etc/containerd/config.toml"
    assert run(host, "install", "--restart-cmd", "false") == 1
    assert config.read_text() == DEBIAN_CONFIG
    assert run(host, "install", "--restart-cmd", "/nonexistent/systemctl restart containerd") == 1
    assert config.read_text() == DEBIAN_CONFIG
    assert run(host, "install") == 0  # and a later run restarts it
    assert restarts(host) == 1
    assert run(host, "uninstall") == 0


def test_the_documented_snippet_is_what_install_adds() -> None:
    snippet = (DEPLOY / "containerd/kata-runtime.toml").read_text()
    assert tomllib.loads(snippet) == tomllib.loads(kd.runtime_tables())


@pytest.mark.skipif(shutil.which("containerd") is None, reason="containerd is not installed")
def test_containerd_reads_runc_and_kata(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(kd.with_block(DEBIAN_CONFIG))
    proc = subprocess.run(["containerd", "--config", str(config), "config", "dump"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    effective = proc.stdout
    assert default_runtime(effective) == "runc"
    assert runtimes(effective)["runc"]["runtime_type"] == "io.containerd.runc.v2"
    assert runtimes(effective)["kata"]["options"] == {
        "ConfigPath": "/usr/share/defaults/kata-containers/configuration.toml"}


def test_the_node_label_is_a_merge_patch(tmp_path: Path) -> None:
    seen: list[tuple[str, str, dict[str, str], Any]] = []

    class Api(BaseHTTPRequestHandler):
        def do_PATCH(self) -> None:  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.command, self.path, dict(self.headers), body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Api)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        api = kd.ApiServer(f"http://127.0.0.1:{server.server_port}", "T0KEN")
        kd.label_node(api, "node-1", "true")
        kd.label_node(api, "node-1", None)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert [(m, p) for m, p, _, _ in seen] == [("PATCH", "/api/v1/nodes/node-1")] * 2
    assert seen[0][2]["Authorization"] == "Bearer T0KEN"
    assert seen[0][2]["Content-Type"] == "application/merge-patch+json"
    assert [b for _, _, _, b in seen] == [{"metadata": {"labels": {kd.LABEL: "true"}}},
                                          {"metadata": {"labels": {kd.LABEL: None}}}]
