"""The ``basque-jax prepare`` command (light: the work is in ``prepare.py``)."""

from __future__ import annotations

import json
import os


def add_prepare_parser(sub) -> None:
    """``basque-jax prepare CONFIG [key=value ...] [--workers N] [--host-id I --num-hosts N]``."""
    p = sub.add_parser("prepare", help="tokenize a run config's data once into prepared shards "
                       "(data.prepared), resumable, parallel, shardable across hosts")
    p.add_argument("config", help="YAML run config (its data: and eval_data: sections)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.prepared=DIR")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes (default: all cores)")
    p.add_argument("--host-id", type=int, default=None,
                   help="this host's index in a pod (default: TPU_WORKER_ID, else 0)")
    p.add_argument("--num-hosts", type=int, default=None,
                   help="hosts preparing together (default: from the TPU worker list, else 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)


def _cmd_prepare(args) -> int:
    from basque_jax.config import load_config
    from basque_jax.data.prepare import default_host, prepare
    from basque_jax.errors import ConfigError

    cfg = load_config(args.config, args.overrides)
    host, hosts = default_host()
    host = host if args.host_id is None else args.host_id
    hosts = hosts if args.num_hosts is None else args.num_hosts
    if not 0 <= host < hosts or args.workers < 1:
        raise ConfigError(f"--host-id {host} must be in [0, --num-hosts {hosts}) and --workers "
                          ">= 1")
    sections = [("data", cfg.data)] + ([("eval_data", cfg.eval_data)]
                                       if cfg.eval_data and cfg.eval_data.prepared else [])
    for name, data in sections:
        if not data.prepared:
            raise ConfigError(f"{name}.prepared: set the folder to prepare the data into")
        summary = prepare(data, workers=args.workers, host_id=host, num_hosts=hosts,
                          progress=not args.no_progress)
        print(f"[prepare] {name}: {json.dumps(summary)}")
    return 0
