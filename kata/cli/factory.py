"""`kata-runtime factory init|status|destroy`: the VM templates sandboxes are restored from."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("factory", help="manage the VM templates sandboxes start from")
    p.add_argument("action", choices=("init", "status", "destroy"))
    p.set_defaults(func=run)


def _default_vm_config(args: argparse.Namespace) -> Any:
    """The VM a container with no limits gets: the template `init` prepares ahead of the first run."""
    from kata.config import load_config
    from kata.sandbox.paths import SandboxPaths
    from kata.sandbox.sandbox import plan_vm

    cfg = load_config(Path(args.config) if args.config else None)
    config, _ = plan_vm(cfg, "factory", {}, SandboxPaths("factory"), args.debug)
    return cfg, config


def run(args: argparse.Namespace) -> int:
    from kata.factory.template import TemplateStore

    cfg, config = _default_vm_config(args)
    store = TemplateStore(Path(cfg.factory.template_path))
    if args.action == "init":
        if not cfg.factory.enable_template:
            print(f"factory: templates are disabled in {cfg.source} ([factory] enable_template)")
            return 0
        state, made = store.ensure(config, cfg.hypervisor)
        print(f"{'made' if made else 'found'} template {state.parent.name} "
              f"({config.vcpus} vCPU, {config.memory_mib} MiB): {state}")
    elif args.action == "status":
        print(f"templates {'enabled' if cfg.factory.enable_template else 'disabled'} in {cfg.source}")
        templates = store.list()
        for key, size in templates:
            print(f"  {key}  {size / 2**20:.1f} MiB  {store.root / key}")
        if not templates:
            print(f"  none under {store.root}")
    else:
        n = store.destroy()
        print(f"removed {n} template(s) from {store.root}")
    return 0
