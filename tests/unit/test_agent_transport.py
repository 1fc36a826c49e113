from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from kata.agent_client.transport import TransportError, connect
from kata.protocols.agent_api import AgentEndpoint


def test_serial_waits_for_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def late_listen() -> None:
        time.sleep(0.2)
        listener.bind(path)
        listener.listen(1)

    t = threading.Thread(target=late_listen)
    t.start()
    stream = connect(AgentEndpoint(kind="serial", path=path), timeout=5.0)
    t.join()
    conn, _ = listener.accept()
    stream.write(b"hi")
    assert conn.recv(2) == b"hi"
    stream.close()
    conn.close()
    listener.close()


def test_timeout_is_one_line(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.sock")
    start = time.monotonic()
    with pytest.raises(TransportError) as err:
        connect(AgentEndpoint(kind="serial", path=path), timeout=0.2)
    assert time.monotonic() - start < 2
    assert "\n" not in str(err.value) and path in str(err.value)
    assert not os.path.exists(path)
