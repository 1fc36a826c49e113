"""`kata-runtime factory init|status|destroy`: the VM templates sandboxes are restored from, and the
warm VM pool (vm_cache_number) that hands them clones ready to run."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

# How long `init` waits for a daemon it started to answer (it answers before its first clone is ready).
_POOL_START_TIMEOUT = 30.0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("factory", help="manage the VM templates and the warm VM pool sandboxes start from")
    p.add_argument("action", choices=("init", "status", "destroy"))
    p.add_argument("--foreground", action="store_true",
                   help="init: run the VM pool daemon (vm_cache_number > 0) in this process, until a signal")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kata.config import load_config
    from kata.factory.pool import default_vm_config
    from kata.factory.template import TemplateStore

    cfg = load_config(Path(args.config) if args.config else None)
    config = default_vm_config(cfg)
    store = TemplateStore(Path(cfg.factory.template_path))
    endpoint = Path(cfg.factory.vm_cache_endpoint)
    if args.action == "init":
        if not cfg.factory.enable_template:
            print(f"factory: templates are disabled in {cfg.source} ([factory] enable_template)")
            return 0
        state, made = store.ensure(config, cfg.hypervisor)
        print(f"{'made' if made else 'found'} template {state.parent.name} "
              f"({config.vcpus} vCPU, {config.memory_mib} MiB): {state}")
        if cfg.factory.vm_cache_number > 0:
            return _start_pool(cfg, args.foreground)
    elif args.action == "status":
        print(f"templates {'enabled' if cfg.factory.enable_template else 'disabled'} in {cfg.source}")
        templates = store.list()
        for key, size in templates:
            print(f"  {key}  {size / 2**20:.1f} MiB  {store.root / key}")
        if not templates:
            print(f"  none under {store.root}")
        _pool_status(endpoint, cfg.factory.vm_cache_number)
    else:
        from kata.factory import pool

        pid = pool.stop(endpoint)
        if pid is not None:
            print(f"stopped the VM pool daemon (pid {pid}) and its VMs")
        n = store.destroy()
        print(f"removed {n} template(s) from {store.root}")
    return 0


def _start_pool(cfg: Any, foreground: bool) -> int:
    from kata.factory import pool
    from kata.hypervisor import daemon

    if foreground:
        pool.PoolDaemon(cfg).serve()
        return 0
    endpoint = Path(cfg.factory.vm_cache_endpoint)
    try:
        answer = pool.call(endpoint, {"op": "status"}, pool.REQUEST_TIMEOUT)
        print(f"VM pool daemon running already (pid {answer.get('pid')}) at {endpoint}")
        return 0
    except pool.PoolError:
        pass
    argv = [sys.executable, "-m", "kata.factory.pool", "--config", str(cfg.source)]
    proc = daemon.launch(argv, pool.LOG_FILE)
    deadline = time.monotonic() + _POOL_START_TIMEOUT
    while time.monotonic() < deadline:
        if not proc.is_alive():
            print(f"factory: the VM pool daemon exited: {daemon.log_tail(pool.LOG_FILE) or 'no output'}",
                  file=sys.stderr)
            return 1
        try:
            pool.call(endpoint, {"op": "status"}, pool.REQUEST_TIMEOUT)
        except pool.PoolError:
            time.sleep(0.05)
            continue
        print(f"VM pool daemon started (pid {proc.pid}), keeping {cfg.factory.vm_cache_number} VM(s) "
              f"at {endpoint}; log {pool.LOG_FILE}")
        return 0
    print(f"factory: the VM pool daemon did not answer within {_POOL_START_TIMEOUT:g}s", file=sys.stderr)
    return 1


def _pool_status(endpoint: Path, target: int) -> None:
    from kata.factory import pool

    try:
        st = pool.call(endpoint, {"op": "status"}, pool.REQUEST_TIMEOUT)
    except pool.PoolError:
        print(f"VM pool: not running (vm_cache_number = {target}; start it with `kata-runtime factory init`)")
        return
    ready = st.get("ready") or []
    print(f"VM pool: daemon pid {st.get('pid')} at {endpoint}: {len(ready)}/{st.get('target')} ready, "
          f"{st.get('warming')} warming; made {st.get('made')}, taken {st.get('taken')}, "
          f"failed {st.get('failed')}")
    for vm in ready:
        print(f"  {st.get('key')}  pid {vm.get('pid')}  idle {vm.get('idle_s')}s")
    if st.get("last_error"):
        print(f"  last error: {ascii(str(st['last_error']))[1:-1]}")
