"""`kata-runtime check`: can this host run Kata VMs, and how (KVM or TCG, vsock or virtio-serial).

The host is read once (check_facts), judged without I/O (check_rules), and printed here: a table of
facts by default, one explained block per check with --verbose, both with --json.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

from kata.cli.check_facts import HostFacts
from kata.cli.check_rules import Check
from kata.config import RuntimeConfig

WIDTH = 100
_INDENT = "    "


def add_parser(sub: Any) -> None:
    p = sub.add_parser("check", aliases=["kata-check"], help="check what this host can do")
    p.add_argument("--json", action="store_true", help="print the facts and checks as JSON")
    p.add_argument("--no-probe", action="store_true", help="do not boot the guest to probe KVM")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="explain each check: what it looked at, why it matters, what to do")
    p.set_defaults(func=run)


def host_facts(facts: HostFacts, cfg: RuntimeConfig) -> dict[str, Any]:
    """The plain output's table (and the JSON's top level), as it was before the checks had reasons."""
    from kata.sandbox.vm import agent_channel

    caps, hv = facts.caps, cfg.hypervisor
    table: dict[str, Any] = {
        "config": str(cfg.source),
        "cpu_hardware_virtualisation": "vmx" if caps.cpu_vmx else "svm" if caps.cpu_svm else "none",
        "dev_kvm": caps.dev_kvm,
        "kvm_module": caps.kvm_module,
        "qemu": f"{caps.qemu_path} ({caps.qemu_version})" if caps.qemu_version else None,
        "virtiofsd": str(caps.virtiofsd) if caps.virtiofsd else None,
        "vhost_vsock": caps.dev_vhost_vsock,
        "vhost_net": caps.dev_vhost_net,
        "guest_kernel": hv.kernel if hv.kernel in facts.present else None,
        "guest_image": hv.image if not hv.image or hv.image in facts.present else None,
    }
    if facts.accel is not None:
        table["accelerator"] = facts.accel.accel
        table["accelerator_reason"] = facts.accel.reason + (" (cached)" if facts.accel.cached else "")
    try:
        table["agent_channel"] = agent_channel(cfg.agent.agent_channel, caps.dev_vhost_vsock)
    except ValueError:
        pass  # the vhost-vsock check reports it
    return table


def _capable(table: dict[str, Any]) -> str:
    accel = table.get("accelerator", "unknown")
    return f"System is capable of running Kata Containers (accelerator: {accel})"


def render_plain(table: dict[str, Any], checks: list[Check]) -> list[str]:
    lines = [f"{key:30s} {value}" for key, value in table.items()]
    problems = [c.problem_line for c in checks if c.status == "problem"]
    lines += [f"ERROR: {p}" for p in problems]
    return lines if problems else [*lines, _capable(table)]


def _wrapped(text: str, first: str, rest: str) -> list[str]:
    # Paths and option values stay whole: a broken path is worse than a long line.
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=rest,
                         break_long_words=False, break_on_hyphens=False)


def render_verbose(table: dict[str, Any], checks: list[Check]) -> list[str]:
    lines: list[str] = []
    for c in checks:
        lines += _wrapped(f"{c.status:8s} {c.name}: {c.found}", "", " " * 9)
        explained = [("looked at", c.looked_at), ("why", c.why)]
        if c.status != "ok":
            explained.append(("to do", c.todo))
        for label, text in explained:
            lines += _wrapped(f"{label}: {text}", _INDENT, _INDENT * 2)
    counts = {s: sum(c.status == s for c in checks) for s in ("ok", "warning", "problem")}
    lines.append(f"{counts['ok']} ok, {counts['warning']} warning(s), {counts['problem']} problem(s)")
    failed = "Sandboxes cannot start here: see each problem"
    lines.append(failed if counts["problem"] else _capable(table))
    return lines


def report(table: dict[str, Any], checks: list[Check]) -> dict[str, Any]:
    """The JSON document: the facts table, the problems' lines, and every check."""
    return {**table, "problems": [c.problem_line for c in checks if c.status == "problem"],
            "checks": [c.as_dict() for c in checks]}


def run(args: argparse.Namespace) -> int:
    from kata.cli.check_facts import gather
    from kata.cli.check_rules import evaluate
    from kata.config import load_config

    cfg = load_config(Path(args.config) if args.config else None)
    facts = gather(cfg, probe=not args.no_probe)
    checks = evaluate(facts, cfg)
    table = host_facts(facts, cfg)
    if args.json:
        print(json.dumps(report(table, checks), indent=2))
    else:
        print("\n".join(render_verbose(table, checks) if args.verbose else render_plain(table, checks)))
    return 1 if any(c.status == "problem" for c in checks) else 0
