#!/usr/bin/env python3
"""Install kata on a containerd host beside runc, or remove it again: what the kata-deploy DaemonSet
(deploy/kubernetes/kata-deploy.yaml) runs on every node, and what works by hand on one host.

    kata_deploy.py [--host-root DIR] [--containerd-config FILE] [--payload DIR] install|uninstall|status

install: checks that the host has what the payload needs (the venv's Python, QEMU, virtiofsd), copies
the payload tree (the project's venv under /opt/kata-containers, the guest assets, the default
configuration.toml, the `containerd-shim-kata-v2` and `kata-runtime` links in /usr/local/bin) into the
host root, appends the kata runtime to containerd's config.toml as one marked block, restarts containerd
if that file changed, and labels the node. Running it again changes nothing.

uninstall: unlabels the node, destroys the VM templates, takes the block out of config.toml (the file
is as it was before install, byte for byte), removes the files install copied (a manifest lists them)
and restarts containerd. runc is never touched and stays containerd's default runtime.

Standard library only, so that any Python 3.11 runs it (the installer image's, or the host's).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tomllib
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CRI = "io.containerd.grpc.v1.cri"
RUNTIME = "kata"
LABEL = "katacontainers.io/kata-runtime"
DEFAULT_CONFIG_PATH = "/usr/share/defaults/kata-containers/configuration.toml"  # kata/config/load.py
VENV = "/opt/kata-containers/venv"  # where the payload's venv is (its scripts name it in their #!)
MANIFEST = "opt/kata-containers/kata-deploy.json"  # under the host root
BEGIN = "# BEGIN kata-deploy"
END = "# END kata-deploy\n"
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class DeployError(Exception):
    """install or uninstall cannot go on; the host is left as it was before the step that failed."""


# --- containerd's config.toml ------------------------------------------------------------------------

def runtime_tables(config_path: str = DEFAULT_CONFIG_PATH, with_runc: bool = True) -> str:
    """The runtime tables kata needs in a version 2 config.toml (containerd 1.6/1.7)."""
    base = f'[plugins."{CRI}".containerd.runtimes'
    text = (f"{base}.{RUNTIME}]\n"
            f'  runtime_type = "io.containerd.kata.v2"\n'
            f"  privileged_without_host_devices = true\n"
            f'  pod_annotations = ["io.katacontainers.*"]\n'
            f"{base}.{RUNTIME}.options]\n"
            f"  ConfigPath = {json.dumps(config_path)}\n")
    if with_runc:
        # containerd 1.6 replaces its default runtimes (runc) with those a config names, and its CRI
        # plugin then refuses to load: default_runtime_name "runc" would name no runtime.
        text += f'{base}.runc]\n  runtime_type = "io.containerd.runc.v2"\n'
    return text


def _runtimes(data: dict[str, Any]) -> dict[str, Any]:
    runtimes = data.get("plugins", {}).get(CRI, {}).get("containerd", {}).get("runtimes", {})
    return runtimes if isinstance(runtimes, dict) else {}


def default_runtime(data: dict[str, Any]) -> str:
    name = data.get("plugins", {}).get(CRI, {}).get("containerd", {}).get("default_runtime_name", "runc")
    return str(name)


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DeployError(f"{where}: not valid TOML: {e}") from None


def without_block(text: str, where: str = "config.toml") -> str:
    """``text`` with install's block taken out: the file as it was before."""
    start = text.find("\n" + BEGIN)
    if start < 0:
        return text
    end = text.find(END, start)
    if end < 0:
        raise DeployError(f"{where}: '{BEGIN}' without '{END.strip()}': fix the file by hand")
    return text[:start] + text[end + len(END):]


def with_block(text: str, config_path: str = DEFAULT_CONFIG_PATH, where: str = "config.toml") -> str:
    """``text`` (a containerd config.toml, maybe empty) with kata's runtime block at its end."""
    original = without_block(text, where)
    data = _parse(original, where)
    version = data.get("version")
    if version not in (None, 2) or (version is None and data):
        raise DeployError(f"{where}: config version {version or 1}: only version 2 (containerd 1.6/1.7) "
                          "is supported; set `version = 2` and name the plugins as that version does")
    runtimes = _runtimes(data)
    if RUNTIME in runtimes:
        raise DeployError(f"{where}: already defines runtime {RUNTIME!r} outside kata-deploy's block: "
                          "remove it, or leave this host's configuration as it is")
    # A top-level key can only come first: an empty file gets its version inside the block.
    head = "version = 2\n" if version is None else ""
    block = (f"\n{BEGIN}: kata beside runc; `kata_deploy.py uninstall` takes it out again\n"
             f"{head}{runtime_tables(config_path, with_runc=not runtimes)}{END}")
    result = original + block
    after = _parse(result, where + " with kata's block")
    if RUNTIME not in _runtimes(after) or default_runtime(after) != default_runtime(data):
        raise DeployError(f"{where}: the block would not add runtime {RUNTIME!r} beside the default")
    return result


def _set_config(path: Path, text: str | None) -> None:
    """Write config.toml (None: remove it)."""
    if text is None:
        path.unlink(missing_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, text)


def _write_atomic(path: Path, text: str) -> None:
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    tmp = path.with_name(f".{path.name}.kata-deploy")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# --- the payload's files -----------------------------------------------------------------------------

@dataclass
class Manifest:
    files: list[str] = field(default_factory=list)  # relative to the host root
    dirs: list[str] = field(default_factory=list)  # the directories install created
    created_config: bool = False  # config.toml did not exist before install

    @classmethod
    def load(cls, root: Path) -> Manifest | None:
        try:
            data = json.loads((root / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        return cls(list(data["files"]), list(data["dirs"]), bool(data.get("created_config")))

    def save(self, root: Path) -> None:
        path = root / MANIFEST
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, json.dumps(self.__dict__, indent=1) + "\n")


def payload_entries(payload: Path) -> tuple[list[str], list[str]]:
    """The payload's directories and its files and symlinks, relative to it, parents first."""
    dirs: list[str] = []
    files: list[str] = []
    for top, dirnames, filenames in os.walk(payload):
        rel = Path(top).relative_to(payload)
        for d in sorted(dirnames):
            (files if (Path(top) / d).is_symlink() else dirs).append(str(rel / d))
        files += [str(rel / f) for f in sorted(filenames)]
    return dirs, files


def host_needs(payload: Path) -> list[str]:
    """Absolute paths the payload uses on the host but does not bring: the targets of its symlinks that
    point out of it (the venv's python), that Python's versioned binary, and the configured QEMU and
    virtiofsd."""
    needs = set()
    _, files = payload_entries(payload)
    for rel in files:
        src = payload / rel
        target = os.readlink(src) if src.is_symlink() else ""
        if target.startswith("/") and not (payload / target[1:]).exists():
            needs.add(target)
        if src.name == "pyvenv.cfg":
            cfg = dict(line.split(" = ", 1) for line in src.read_text().splitlines() if " = " in line)
            if "home" in cfg and "version" in cfg:
                needs.add(f"{cfg['home']}/python{'.'.join(cfg['version'].split('.')[:2])}")
    conf = payload / DEFAULT_CONFIG_PATH.lstrip("/")
    if conf.is_file():
        qemu = tomllib.loads(conf.read_text()).get("hypervisor", {}).get("qemu", {})
        needs |= {qemu[k] for k in ("path", "virtio_fs_daemon") if qemu.get(k)}
    return sorted(needs)


def copy_payload(payload: Path, root: Path, before: Manifest | None, force: bool) -> Manifest:
    dirs, files = payload_entries(payload)
    ours = set(before.files) if before else set()
    conflicts = [f for f in files if (root / f).is_symlink() or (root / f).exists()]
    conflicts = [f for f in conflicts if f not in ours]
    if conflicts and not force:
        raise DeployError(f"{len(conflicts)} file(s) exist that kata-deploy did not install, e.g. "
                          f"/{conflicts[0]} (a manual install?): remove them or pass --force")
    made = list(before.dirs) if before else []
    for d in dirs:
        if not (root / d).is_dir():
            (root / d).mkdir(parents=True)
            made.append(d)
    for rel in files:
        src, dest = payload / rel, root / rel
        tmp = dest.with_name(f".{dest.name}.kata-deploy")
        tmp.unlink(missing_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), tmp)
        else:
            shutil.copy2(src, tmp)
        os.replace(tmp, dest)  # a running binary keeps its old inode
    for gone in sorted(ours - set(files)):  # an upgrade dropped them
        (root / gone).unlink(missing_ok=True)
    return Manifest(files, made)


def remove_payload(root: Path, manifest: Manifest) -> list[str]:
    """Remove install's files, then its directories if only our Python's byte code is left in them."""
    for rel in [*manifest.files, MANIFEST]:
        (root / rel).unlink(missing_ok=True)
    kept = []
    for rel in sorted(manifest.dirs, key=lambda d: d.count("/"), reverse=True):
        d = root / rel
        if (d / "__pycache__").is_dir():
            shutil.rmtree(d / "__pycache__")
        try:
            d.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            kept.append(f"/{rel}")  # someone else's files are in it
    return kept


# --- the host and the node ---------------------------------------------------------------------------

def host_command(prefix: str, command: str) -> None:
    """``command`` on the host (through ``prefix``, e.g. nsenter into PID 1's namespaces); "" skips it."""
    if not command:
        return
    argv = shlex.split(prefix) + shlex.split(command)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DeployError(f"`{command}`: {e}") from None
    if proc.returncode != 0:
        raise DeployError(f"`{command}` failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")


@dataclass(frozen=True)
class ApiServer:
    url: str
    token: str
    cafile: str | None = None

    @classmethod
    def in_cluster(cls) -> ApiServer:
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", (SERVICE_ACCOUNT / "token").read_text().strip(),
                   str(SERVICE_ACCOUNT / "ca.crt"))


def label_node(api: ApiServer, node: str, value: str | None) -> None:
    """Set (or with None remove) the label the RuntimeClass schedules kata pods by."""
    body = json.dumps({"metadata": {"labels": {LABEL: value}}}).encode()
    req = urllib.request.Request(f"{api.url}/api/v1/nodes/{node}", data=body, method="PATCH", headers={
        "Authorization": f"Bearer {api.token}", "Content-Type": "application/merge-patch+json"})
    ctx = ssl.create_default_context(cafile=api.cafile) if api.url.startswith("https:") else None
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx):
            pass
    except OSError as e:  # URLError and HTTPError are OSErrors
        raise DeployError(f"cannot label node {node}: {e}") from None


# --- the commands ------------------------------------------------------------------------------------

@dataclass
class Options:
    root: Path
    containerd_config: str
    payload: Path
    config_path: str
    host_exec: str
    restart: str
    cleanup: str
    node: str | None
    force: bool
    start: str = ""  # run on the host once kata is installed (the VM templates and the warm pool)


def _config_file(o: Options) -> Path:
    return o.root / o.containerd_config.lstrip("/")


def _restart(o: Options, conf: Path, old: str | None) -> None:
    """Restart containerd on its new config.toml; if that fails, put the old one back."""
    try:
        host_command(o.host_exec, o.restart)
    except DeployError:
        _set_config(conf, old)
        raise


def install(o: Options, api: ApiServer | None = None) -> None:
    missing = [p for p in host_needs(o.payload) if not (o.root / p.lstrip("/")).exists()]
    if missing:
        raise DeployError("the host lacks " + ", ".join(missing) + " (Debian 12: apt-get install python3 "
                          "qemu-system-x86); nothing was installed")
    conf = _config_file(o)
    before = Manifest.load(o.root)
    old = conf.read_text() if conf.exists() else None
    new = with_block(old or "", o.config_path, str(conf))  # checked before any file is copied
    manifest = copy_payload(o.payload, o.root, before, o.force)
    manifest.created_config = before.created_config if before else old is None
    manifest.save(o.root)
    if new != old:
        _set_config(conf, new)
        _restart(o, conf, old)
        print(f"kata-deploy: added runtime {RUNTIME!r} to {conf}")
    print(f"kata-deploy: {len(manifest.files)} files installed under {o.root}")
    try:
        host_command(o.host_exec, o.start)
    except DeployError as e:  # kata works without templates or a pool, only starts slower
        print(f"kata-deploy: warning: {e}", file=sys.stderr)
    if o.node:
        label_node(api or ApiServer.in_cluster(), o.node, "true")


def uninstall(o: Options, api: ApiServer | None = None) -> None:
    if o.node:  # first, so that no new kata pod is scheduled here
        label_node(api or ApiServer.in_cluster(), o.node, None)
    manifest = Manifest.load(o.root)
    if manifest:
        try:
            host_command(o.host_exec, o.cleanup)
        except DeployError as e:  # a template left behind is no reason to keep kata installed
            print(f"kata-deploy: warning: {e}", file=sys.stderr)
    conf = _config_file(o)
    if conf.exists():
        old = conf.read_text()
        new = without_block(old, str(conf))
        if new != old:
            _set_config(conf, None if new == "" and manifest and manifest.created_config else new)
            _restart(o, conf, old)
            print(f"kata-deploy: removed runtime {RUNTIME!r} from {conf}")
    if manifest:
        kept = remove_payload(o.root, manifest)
        print(f"kata-deploy: {len(manifest.files)} files removed"
              + (f"; kept {', '.join(kept)} (not empty)" if kept else ""))


def status(o: Options) -> bool:
    """Print what is installed; whether kata is fully installed."""
    conf = _config_file(o)
    data = _parse(conf.read_text(), str(conf)) if conf.exists() else {}
    manifest = Manifest.load(o.root)
    lost = [f for f in manifest.files if not (o.root / f).is_symlink() and not (o.root / f).exists()] \
        if manifest else []
    print(f"containerd config {conf}: runtimes {sorted(_runtimes(data)) or '(containerd defaults)'}, "
          f"default {default_runtime(data)!r}")
    print(f"payload: {len(manifest.files) if manifest else 0} files installed, {len(lost)} missing")
    ok = manifest is not None and not lost and RUNTIME in _runtimes(data)
    print("kata: installed" if ok else "kata: not installed")
    return ok


def stay() -> None:
    """Keep a DaemonSet's container running after install; SIGTERM ends it (preStop uninstalls)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


def parse_args(argv: Sequence[str] | None = None) -> tuple[str, Options, bool]:
    env = os.environ.get
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("command", choices=("install", "uninstall", "status"))
    ap.add_argument("--host-root", default=env("KATA_DEPLOY_HOST_ROOT", "/"),
                    help="where the host's / is (the DaemonSet mounts it at /host)")
    ap.add_argument("--containerd-config", default=env("KATA_DEPLOY_CONTAINERD_CONFIG",
                                                        "/etc/containerd/config.toml"))
    ap.add_argument("--payload", default=env("KATA_DEPLOY_PAYLOAD", "/payload"),
                    help="the tree to copy into the host root")
    ap.add_argument("--config-path", default=DEFAULT_CONFIG_PATH, help="the runtime's ConfigPath option")
    ap.add_argument("--host-exec", default=env("KATA_DEPLOY_HOST_EXEC", ""),
                    help="prefix that runs a command on the host, e.g. 'nsenter -t 1 -m -u -i -n -p --'")
    ap.add_argument("--restart-cmd", default=env("KATA_DEPLOY_RESTART", "systemctl restart containerd"),
                    help="how containerd is restarted on the host ('' not at all)")
    ap.add_argument("--cleanup-cmd",
                    default=env("KATA_DEPLOY_CLEANUP", f"{VENV}/bin/kata-runtime factory destroy"),
                    help="run on the host before uninstall removes the files ('' nothing)")
    ap.add_argument("--start-cmd", default=env("KATA_DEPLOY_START", f"{VENV}/bin/kata-runtime factory init"),
                    help="run on the host after install: the VM templates, and the warm VM pool when the "
                         "configuration keeps one ('' nothing)")
    ap.add_argument("--node", default=env("NODE_NAME") or None, help="the Kubernetes node to (un)label")
    ap.add_argument("--force", action="store_true", help="overwrite files kata-deploy did not install")
    ap.add_argument("--stay", action="store_true", help="after install, run until SIGTERM")
    a = ap.parse_args(argv)
    return a.command, Options(Path(a.host_root), a.containerd_config, Path(a.payload), a.config_path,
                              a.host_exec, a.restart_cmd, a.cleanup_cmd, a.node, a.force, a.start_cmd), a.stay


def main(argv: Sequence[str] | None = None) -> int:
    command, o, keep_running = parse_args(argv)
    try:
        if command == "status":
            return 0 if status(o) else 1
        (install if command == "install" else uninstall)(o)
    except DeployError as e:
        print(f"kata-deploy: {e}", file=sys.stderr)
        return 1
    if keep_running:
        stay()
    return 0


if __name__ == "__main__":
    sys.exit(main())
