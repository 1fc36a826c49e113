"""The warm VM pool's protocol and bounds (kata.factory.pool), without a VM: requests are bounded
JSON lines, only root is answered, a sandbox id is checked before anything moves, a clone of another
shape is never handed out, and a dead pool's VMs are swept."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from kata.config import ConfigError, load_config
from kata.factory import pool, pool_client
from kata.factory.template import template_key
from kata.hypervisor.base import SharedFs, VMConfig
from kata.hypervisor.qemu import QemuState
from kata.sandbox.paths import VIRTIOFSD_SOCKET
from kata.utils.process import ProcessId
from kata.utils.sockets import listen_private


def vm_config(tmp_path: Path) -> VMConfig:
    kernel, image = tmp_path / "vmlinux", tmp_path / "image"
    for f in (kernel, image):
        f.write_bytes(b"x")
    return VMConfig(
        id="factory", hypervisor_path=Path("/bin/sh"), kernel=kernel, image=image, initrd=None,
        kernel_params=("console=ttyS0",), vcpus=1, max_vcpus=1, memory_mib=512, max_memory_mib=512,
        machine_type="q35", accel="tcg", agent_channel="virtio-serial", run_dir=tmp_path / "run",
        shared_fs=SharedFs("virtio-fs", tmp_path / "share", vhost_user_socket=tmp_path / "s", hotplug=True),
    )


def daemon(tmp_path: Path) -> pool.PoolDaemon:
    cfg = load_config()
    cfg = dataclasses.replace(cfg, factory=dataclasses.replace(cfg.factory, vm_cache_number=2,
                                                               template_path=str(tmp_path / "templates")))
    return pool.PoolDaemon(cfg, vm_config(tmp_path), root=tmp_path / "pool")


def test_messages_are_bounded_json_objects() -> None:
    a, b = socket.socketpair()
    with a, b:
        pool_client.send(a, {"op": "status"})
        assert pool_client.receive(b) == {"op": "status"}
        with pytest.raises(pool.PoolError, match="too long"):
            pool_client.send(a, {"x": "y" * pool_client.MAX_MESSAGE})
        a.sendall(b"[1, 2]\n")
        with pytest.raises(pool.PoolError, match="not a JSON object"):
            pool_client.receive(b)
        a.sendall(b"{" + b" " * pool_client.MAX_MESSAGE)
        with pytest.raises(pool.PoolError, match="longer than"):
            pool_client.receive(b)
    c, d = socket.socketpair()
    with d:
        c.sendall(b'{"op": ')
        c.close()
        with pytest.raises(pool.PoolError, match="closed before"):
            pool_client.receive(d)


@pytest.mark.parametrize(("msg", "error"), [
    ({"op": "launch"}, "unknown op"),
    ({"op": "take", "key": 1, "sid": "a"}, "needs a key and a sid"),
    ({"op": "take", "key": "k"}, "needs a key and a sid"),
    ({"op": "take", "key": "k", "sid": "../../etc"}, "invalid"),
    ({"op": "take", "key": "k", "sid": "a/b"}, "invalid"),
    ({"op": "take", "key": "k", "sid": "x" * 300}, "invalid"),
    ({"op": "take", "key": "k", "sid": ""}, "empty"),
    ({"op": "take", "key": "k", "sid": "a", "share": "-o cache=always"}, "list of virtiofsd options"),
    ({"op": "take", "key": "k", "sid": "a", "share": [1]}, "list of virtiofsd options"),
    ({"op": "take", "key": "k", "sid": "a", "netns": "cni-1234"}, "absolute path"),
    ({"op": "take", "key": "k", "sid": "a", "netns": 3}, "absolute path"),
])
def test_bad_requests_are_refused(tmp_path: Path, msg: dict[str, object], error: str) -> None:
    answer = daemon(tmp_path).handle(msg)
    assert error in answer["error"]
    assert not (tmp_path / "pool").exists()


def test_a_clone_without_the_virtiofsd_the_sandbox_expects_is_not_handed_out(tmp_path: Path) -> None:
    """The sandbox attaches to a pooled clone's virtiofsd as its own: a clone with none is refused to
    a sandbox that would start one (nothing moves, the clone stays ready)."""
    class Running:
        def is_running(self) -> bool:
            return True

        def pids(self) -> list[int]:
            return [os.getpid()]

    d = daemon(tmp_path)
    key = template_key(d.config)
    d.ready.append(pool.Slot("s1", key, tmp_path / "pool" / key / "s1", Running()))  # type: ignore[arg-type]
    answer = d.handle({"op": "take", "key": key, "sid": "c1", "share": ["/usr/lib/qemu/virtiofsd"]})
    assert answer == {"vm_dir": None, "why": "another virtiofsd"}
    assert [s.name for s in d.ready] == ["s1"] and not (tmp_path / "pool").exists()


def test_another_shape_or_an_empty_pool_gets_nothing(tmp_path: Path) -> None:
    d = daemon(tmp_path)
    assert d.handle({"op": "take", "key": "0123456789abcdef", "sid": "c1"}) == {"vm_dir": None,
                                                                               "why": "another shape"}
    assert d.handle({"op": "take", "key": template_key(d.config), "sid": "c1"}) == {"vm_dir": None,
                                                                                   "why": "empty"}
    # A rebuilt image is another shape: the key the pool compares against is the one of now.
    key = template_key(d.config)
    (tmp_path / "image").write_bytes(b"rebuilt")
    assert d.handle({"op": "take", "key": key, "sid": "c1"})["why"] == "another shape"
    # One mapped as persistent memory has its size on QEMU's command line: the pool's follows it.
    d.config = dataclasses.replace(d.config, image_pmem_size=7)
    os.truncate(tmp_path / "image", 4 << 20)
    key = d.current_key()
    assert d.config.image_pmem_size == 4 << 20
    assert d.handle({"op": "take", "key": key, "sid": "c1"})["why"] == "empty"
    st = d.handle({"op": "status"})
    assert (st["target"], st["ready"], st["taken"]) == (2, [], 0)


def test_take_without_a_daemon_is_none(tmp_path: Path) -> None:
    assert pool_client.take(tmp_path / "none.sock", "k", "c1") is None
    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # bound, nobody listening: connection refused
    assert pool_client.take(path, "k", "c1") is None


def test_only_root_is_answered(tmp_path: Path) -> None:
    """SO_PEERCRED: a client of another uid gets an error, whatever it asks (the socket's 0700
    directory keeps it out in the first place; here it is opened up to reach the check)."""
    d = daemon(tmp_path)
    open_dir = Path("/tmp") / f"pool-test-{os.getpid()}"
    open_dir.mkdir(mode=0o755)
    try:
        endpoint = open_dir / "pool.sock"
        listener = listen_private(str(endpoint), 16)
        os.chmod(endpoint, 0o777)
        # It is answered before it says anything: the peer's uid alone decides.
        client = (f"import socket; s=socket.socket(socket.AF_UNIX); s.connect({str(endpoint)!r}); "
                  "print(s.recv(4096).decode())")
        proc = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                 "/usr/bin/python3", "-c", client], stdout=subprocess.PIPE, text=True,
                                cwd="/")
        listener.settimeout(10)
        with listener:
            conn, _ = listener.accept()
            with conn:
                d._one(conn)
        out, _ = proc.communicate(timeout=10)
        assert json.loads(out) == {"error": "the VM pool answers root alone"}
        # root is answered
        with listen_private(str(endpoint), 16) as listener2:
            listener2.settimeout(10)
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(endpoint))
            pool_client.send(s, {"op": "status"})
            conn, _ = listener2.accept()
            with conn:
                d._one(conn)
            assert pool_client.receive(s)["target"] == 2
            s.close()
    finally:
        for f in open_dir.iterdir():
            f.unlink()
        open_dir.rmdir()


def test_sweep_kills_what_a_dead_pool_left(tmp_path: Path) -> None:
    root = tmp_path / "pool"
    slot = root / "0123456789abcdef" / "1-1"
    slot.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        ident = ProcessId.of(sleeper.pid)
        assert ident is not None
        QemuState(id="pool-1-1", pid=ident.pid, start_time=ident.start_time, machine_type="q35",
                  agent_channel="virtio-serial", vsock_cid=0, memory_mib=512, max_memory_mib=512,
                  shared_memory=True).save(slot / "qemu.json")
        (root / "other" / "2-1").mkdir(parents=True)  # no record: only removed
        assert pool.sweep(root) == 1
        assert not ident.is_alive()
        assert list(root.iterdir()) == []
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_watcher_sweeps_once_its_daemon_is_gone(tmp_path: Path) -> None:
    """However the daemon ends (here: SIGKILL), its forked watcher kills what is left in the pool: the
    clones' QEMUs and virtiofsds (their pid files name them), and removes their directories and shares."""
    root = tmp_path / "pool"
    shares = tmp_path / "shares"
    slot = root / "k" / "1-1"
    slot.mkdir(parents=True)
    (shares / "k" / "1-1" / "mounts").mkdir(parents=True)
    sleepers = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(2)]
    try:
        qemu, virtiofsd = (ProcessId.of(p.pid) for p in sleepers)
        assert qemu is not None and virtiofsd is not None
        QemuState(id="p", pid=qemu.pid, start_time=qemu.start_time, machine_type="q35",
                  agent_channel="virtio-serial", vsock_cid=0, memory_mib=512, max_memory_mib=512,
                  shared_memory=True).save(slot / "qemu.json")
        (slot / f"{VIRTIOFSD_SOCKET}.pid").write_text(f"{virtiofsd.pid} {virtiofsd.start_time}\n")
        fake_daemon = os.fork()
        if fake_daemon == 0:
            try:
                pool._start_watcher(root, shares)
                time.sleep(60)
            finally:
                os._exit(0)
        time.sleep(0.3)
        assert all(p.poll() is None for p in sleepers)
        os.kill(fake_daemon, signal.SIGKILL)
        os.waitpid(fake_daemon, 0)
        deadline = time.monotonic() + 10
        while (qemu.is_alive() or virtiofsd.is_alive()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not qemu.is_alive() and not virtiofsd.is_alive()
        deadline = time.monotonic() + 5
        while (list(root.iterdir()) or list(shares.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(root.iterdir()) == [] and list(shares.iterdir()) == []
    finally:
        for p in sleepers:
            p.kill()
            p.wait()


def test_vm_cache_keys_are_checked(tmp_path: Path) -> None:
    q = "[hypervisor.qemu]\n"
    for bad, match in (("vm_cache_number = -1", "vm_cache_number"),
                       ("vm_cache_number = 99", "vm_cache_number"),
                       ('vm_cache_endpoint = "pool.sock"', "vm_cache_endpoint"),
                       (f'vm_cache_endpoint = "/{"x" * 120}"', "vm_cache_endpoint")):
        conf = tmp_path / "c.toml"
        conf.write_text(q + f"[factory]\n{bad}\n")
        with pytest.raises(ConfigError, match=match):
            load_config(conf, env={})
    conf.write_text(q + "[factory]\nvm_cache_number = 2\n")
    assert load_config(conf, env={}).factory.vm_cache_number == 2


def test_a_9p_share_is_not_pooled(tmp_path: Path) -> None:
    c = vm_config(tmp_path)
    assert pool.poolable(c) is None
    nine_p = dataclasses.replace(c, shared_fs=SharedFs("virtio-9p", tmp_path))
    assert "virtio-9p" in str(pool.poolable(nine_p))
    assert "vsock" in str(pool.poolable(dataclasses.replace(c, agent_channel="vsock")))


def test_a_pooled_tap_moves_only_into_a_network_namespace(tmp_path: Path) -> None:
    """take's netns comes from a caller: anything but a network namespace is refused before any move,
    without opening what is there (a FIFO would block the daemon)."""
    from kata.factory.pool_nic import PooledNic, move
    from kata.utils.mount import MS_BIND, mount, unmount

    nic = PooledNic("kpool-none", "02:00:00:00:00:01")
    uts = tmp_path / "uts"
    uts.touch()
    # A namespace of another type, pinned as `ip netns` pins one.
    mount("/proc/self/ns/uts", str(uts), None, MS_BIND)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    try:
        for path, why in ((uts, "of type uts, not network"), (fifo, "not a namespace"),
                          (tmp_path / "missing", "No such file")):
            with pytest.raises(OSError, match=why):
                move(nic, str(path))
    finally:
        unmount(str(uts))


def test_a_clone_whose_guest_does_not_answer_its_warm_up_is_not_kept() -> None:
    """A warm-up the agent refuses or fails leaves a clone that is only slower; one that times out, or
    whose connection is gone, must not be handed to a sandbox."""
    from kata import ttrpc
    from kata.agent_client.client import AgentError
    from kata.factory.pool import _warm_up

    class Client:
        def __init__(self, code: ttrpc.Code | None) -> None:
            self.code = code

        def warm_up(self, *, timeout: float) -> None:
            if self.code is not None:
                raise AgentError("WarmUp", self.code, "no")

    assert _warm_up(Client(None), "c", 1.0) is True  # type: ignore[arg-type]
    assert _warm_up(Client(ttrpc.Code.INVALID_ARGUMENT), "c", 1.0) is False  # type: ignore[arg-type]
    for code in (ttrpc.Code.DEADLINE_EXCEEDED, ttrpc.Code.UNAVAILABLE):
        with pytest.raises(AgentError):
            _warm_up(Client(code), "c", 1.0)  # type: ignore[arg-type]
