"""`kata-runtime check`: can this host run Kata VMs, and how (KVM or TCG, vsock or virtio-serial)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("check", aliases=["kata-check"], help="check what this host can do")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.add_argument("--no-probe", action="store_true", help="do not boot the guest to probe KVM")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kata.config import load_config
    from kata.hypervisor.accel import choose_accel, host_capabilities

    cfg = load_config(Path(args.config) if args.config else None)
    hv = cfg.hypervisor
    caps = host_capabilities(Path(hv.path))
    facts: dict[str, Any] = {
        "config": str(cfg.source),
        "cpu_hardware_virtualisation": "vmx" if caps.cpu_vmx else "svm" if caps.cpu_svm else "none",
        "dev_kvm": caps.dev_kvm,
        "kvm_module": caps.kvm_module,
        "qemu": f"{caps.qemu_path} ({caps.qemu_version})" if caps.qemu_version else None,
        "virtiofsd": str(caps.virtiofsd) if caps.virtiofsd else None,
        "vhost_vsock": caps.dev_vhost_vsock,
        "vhost_net": caps.dev_vhost_net,
        "guest_kernel": hv.kernel if Path(hv.kernel).exists() else None,
        "guest_image": hv.image if not hv.image or Path(hv.image).exists() else None,
    }
    problems = []
    if not caps.qemu_version:
        problems.append(f"QEMU {hv.path} is missing or does not run")
    if hv.shared_fs == "virtio-fs" and not Path(hv.virtio_fs_daemon).exists():
        problems.append(f"virtiofsd {hv.virtio_fs_daemon} is missing (set shared_fs = \"virtio-9p\")")
    if facts["guest_kernel"] is None:
        problems.append(f"guest kernel {hv.kernel} is missing: run `kata-osbuilder build`")
    if hv.image and facts["guest_image"] is None:
        problems.append(f"guest image {hv.image} is missing: run `kata-osbuilder build`")

    if not args.no_probe and caps.qemu_version and facts["guest_kernel"]:
        result = choose_accel(Path(hv.path), Path(hv.kernel), force=hv.accel)  # type: ignore[arg-type]
        facts["accelerator"] = result.accel
        facts["accelerator_reason"] = result.reason + (" (cached)" if result.cached else "")
    from kata.sandbox.vm import agent_channel

    try:
        facts["agent_channel"] = agent_channel(cfg.agent.agent_channel, caps.dev_vhost_vsock)
    except ValueError as exc:
        problems.append(str(exc))
    facts["problems"] = problems

    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        for key, value in facts.items():
            if key != "problems":
                print(f"{key:30s} {value}")
        for p in problems:
            print(f"ERROR: {p}")
        if not problems:
            accel = facts.get("accelerator", "unknown")
            print(f"System is capable of running Kata Containers (accelerator: {accel})")
    return 1 if problems else 0
