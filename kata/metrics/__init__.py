"""Prometheus metrics of sandboxes: each sandbox serves its own (the shim for a pod, the init monitor for
a container of the runc path) on a root-only unix socket, and `kata-monitor` gathers them for Prometheus.

``figures`` holds the checked numbers, ``host`` reads them from /proc for the VMM, virtiofsd and the shim,
``guest`` asks the agent (GetMetrics) and checks what it answers, ``families`` makes Kata's metric families
with prometheus-client, ``endpoint`` serves and fetches one sandbox's text, ``kata_monitor`` is the command.
"""

from kata.errors import KataError


class MetricsError(KataError):
    """A sandbox's figures could not be had: its scrape fails, in one line."""
