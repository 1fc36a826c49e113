#!/usr/bin/env python3
"""Round-trip benchmark of a small unary ttrpc call, no VM:

    python bench/ttrpc_roundtrip.py [--calls N] [--threads T ...]

Client and server run in this one process over a unix socketpair (and a pipe pair), which is the cost
the agent channel adds on top of the transport itself.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from google.protobuf.wrappers_pb2 import StringValue

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kata.ttrpc import Client, Context, Method, Server, Stream  # noqa: E402
from tests.support.streams import pipe_pair, socket_pair  # noqa: E402


def _echo(ctx: Context, req: StringValue) -> StringValue:
    return req


def run(pair: Callable[[], tuple[Stream, Stream]], calls: int, threads: int) -> str:
    client_stream, server_stream = pair()
    server = Server()
    server.register_service("bench.Echo", {"Echo": Method(StringValue, _echo)})
    threading.Thread(target=server.serve, args=(server_stream,), daemon=True).start()
    client = Client(client_stream)
    request = StringValue(value="ping")
    for _ in range(200):  # warm up threads and caches
        client.call("bench.Echo", "Echo", request, StringValue)

    latencies: list[float] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        mine = []
        for _ in range(n):
            t0 = time.perf_counter()
            client.call("bench.Echo", "Echo", request, StringValue, timeout=10)
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    workers = [threading.Thread(target=worker, args=(calls // threads,)) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    client.close()
    server.shutdown()
    server_stream.close()

    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e6

    return (
        f"{len(latencies) / elapsed:8.0f} calls/s  p50 {pct(0.5):6.0f} us  p90 {pct(0.9):6.0f} us  "
        f"p99 {pct(0.99):6.0f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 8])
    args = parser.parse_args()
    for name, pair in (("socketpair", socket_pair), ("pipes", pipe_pair)):
        for threads in args.threads:
            print(f"{name:10} threads={threads:<3} {run(pair, args.calls, threads)}")


if __name__ == "__main__":
    main()
