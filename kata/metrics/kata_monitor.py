"""kata-monitor: one Prometheus target for every sandbox on the host, as Kata's command of that name.

On each GET /metrics it finds the running sandboxes (kata.metrics.discovery), scrapes all of them at
once, each within --scrape-timeout (a sandbox that is gone or slow is left out of that answer and
counted as failed, never waited for beyond it), and serves their series with `sandbox_id` and, for a
pod the CRI made, `cri_uid`, `cri_name` and `cri_namespace` added, beside its own kata_monitor_* figures.
GET /sandboxes lists the sandboxes' ids, one a line.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from kata.metrics import MetricsError
from kata.metrics.discovery import Found, running_sandboxes
from kata.metrics.endpoint import fetch
from kata.metrics.families import CONTENT_TYPE
from kata.utils.text import one_line
from kata.utils.usage import Parser, UsageError

log = logging.getLogger("kata-monitor")
DEFAULT_LISTEN = "127.0.0.1:8090"
DEFAULT_SCRAPE_TIMEOUT = 3.0
# Scrapes of sandboxes in flight at once, over every request; one that outlives its request still
# ends by its own deadline (kata.metrics.endpoint.fetch).
_WORKERS = 32


class Monitor:
    def __init__(self, scrape_timeout: float, root: Path | None = None) -> None:
        """``root``: the state root sandboxes are found under (kata.sandbox.paths.STATE_ROOT by default)."""
        self.scrape_timeout = scrape_timeout
        self.root = root
        self.pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="scrape")
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(namespace="kata_monitor", registry=self.registry)
        # Kata's names; prometheus-client adds _total to the counters.
        self.scrapes = Counter("kata_monitor_scrape_count", "Scrapes of kata-monitor.",
                               registry=self.registry)
        self.failed = Counter("kata_monitor_scrape_failed_count", "Sandbox scrapes that failed or timed out.",
                              registry=self.registry)
        self.running = Gauge("kata_monitor_running_shim_count", "Sandboxes found running (shims and the runc "
                             "path's init monitors).", registry=self.registry)
        self.duration = Histogram("kata_monitor_scrape_durations_histogram_milliseconds",
                                  "Time to scrape every sandbox, in milliseconds.", registry=self.registry,
                                  buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))

    def metrics(self) -> bytes:
        start = time.monotonic()
        self.scrapes.inc()
        found = running_sandboxes(self.root)
        self.running.set(len(found))
        texts = self.scrape(found)
        sandboxes = _Sandboxes(found, texts)
        self.duration.observe((time.monotonic() - start) * 1000)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(sandboxes)
        return generate_latest(self.registry) + generate_latest(registry)

    def scrape(self, found: Sequence[Found]) -> dict[str, str]:
        """Each sandbox's text, by id, for those that answered within the timeout."""
        futures: dict[Future[bytes], Found] = {self.pool.submit(fetch, f.socket, self.scrape_timeout): f
                                               for f in found}
        done, late = wait(futures, timeout=self.scrape_timeout + 0.5)
        texts = {}
        for future in done:
            sandbox = futures[future]
            try:
                texts[sandbox.id] = future.result().decode()
            except (MetricsError, UnicodeDecodeError) as exc:
                self.failed.inc()
                log.warning(f"sandbox {sandbox.id}: {one_line(exc)}")
        for future in late:
            self.failed.inc()
            log.warning(f"sandbox {futures[future].id}: no answer within {self.scrape_timeout:g}s")
        return texts


class _Sandboxes(Collector):
    """The sandboxes' families, merged by name (a family's series must come together), each series
    with its sandbox's labels added."""

    def __init__(self, found: Sequence[Found], texts: dict[str, str]) -> None:
        self.found, self.texts = found, texts

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for sandbox in self.found:
            text = self.texts.get(sandbox.id)
            if text is None:
                continue
            try:
                families = list(text_string_to_metric_families(text))
            except ValueError as exc:  # our shims write what the parser reads: a bug, not a sandbox's fault
                log.warning(f"sandbox {sandbox.id}: unreadable metrics: {one_line(exc)}")
                continue
            for family in families:
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation, family.type)
                elif into.type != family.type:
                    continue
                for s in family.samples:
                    into.add_sample(s.name, {**s.labels, **sandbox.labels}, s.value, s.timestamp)
        yield from merged.values()


def _handler(monitor: Monitor) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 30.0  # a client that sends nothing holds its thread no longer

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?")[0]
            if path == "/metrics":
                self._reply(200, monitor.metrics(), CONTENT_TYPE)
            elif path == "/sandboxes":
                ids = "".join(f"{f.id}\n" for f in running_sandboxes(monitor.root))
                self._reply(200, ids.encode(), "text/plain; charset=utf-8")
            else:
                self._reply(404, b"not found: try /metrics or /sandboxes\n", "text/plain")

        def _reply(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's name
            log.debug(format % args)

    return Handler


def parse_listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise UsageError(f"invalid --listen-address {text!r}: want HOST:PORT")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> int:
    p = Parser(prog="kata-monitor", description="Prometheus metrics of every Kata sandbox on this host")
    p.add_argument("--listen-address", default=DEFAULT_LISTEN,
                   help=f"HOST:PORT to serve on (default {DEFAULT_LISTEN})")
    p.add_argument("--scrape-timeout", type=float, default=DEFAULT_SCRAPE_TIMEOUT,
                   help="seconds a sandbox has to answer a scrape (default %(default)s)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warn", "error"))
    try:
        args = p.parse_args(argv)
        host, port = parse_listen_address(args.listen_address)
        if not 0 < args.scrape_timeout <= 60:
            raise UsageError(f"invalid --scrape-timeout {args.scrape_timeout:g}: want 0 to 60 seconds")
    except UsageError as exc:
        print(f"kata-monitor: {one_line(exc)}", file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper().replace("WARN", "WARNING"), stream=sys.stderr,
                        format="kata-monitor: %(levelname)s: %(message)s")
    monitor = Monitor(args.scrape_timeout)
    try:
        server = ThreadingHTTPServer((host, port), _handler(monitor))
    except OSError as exc:
        print(f"kata-monitor: listen on {args.listen_address}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    server.daemon_threads = True
    log.info(f"serving /metrics and /sandboxes on {args.listen_address}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
