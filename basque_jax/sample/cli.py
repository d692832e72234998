"""``basque-jax generate | translate CONFIG.yaml [key=value ...]`` and
``basque-jax filter IN [IN ...] OUT [--config F.yaml] [key=value ...]``."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def add_sample_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the generate, translate and filter sub-commands."""
    from basque_jax.distributed import add_arguments as add_distributed_arguments

    for name, help_text, example, func in (
            ("generate", "Magpie: synthesize instruction/response pairs with the instruct "
             "model", "num_samples=100", _cmd_generate),
            ("translate", "translate a chat data set into Basque turn by turn",
             "num_records=10", _cmd_translate)):
        job = sub.add_parser(name, help=f"{help_text} (resumable JSONL shards)")
        job.add_argument("config", help=f"YAML {name} config (see configs/sample/)")
        job.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
        job.set_defaults(func=func)
        add_distributed_arguments(job)
    flt = sub.add_parser("filter", help="length, repetition, language, translation-task and "
                         "(near-)duplicate filters over JSONL conversations, with a report")
    flt.add_argument("paths", nargs="+", metavar="PATH",
                     help="input JSONL files / globs / shard folders, then the OUTPUT file, "
                     "then optional key=value filter settings (e.g. language=null)")
    flt.add_argument("--config", default=None, help="YAML with filter settings (FilterConfig)")
    flt.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a filter setting, e.g. language=null")
    flt.add_argument("--report", default=None, help="report path (default OUTPUT.report.json)")
    flt.set_defaults(func=_cmd_filter)


def _run_job(command: str, args: argparse.Namespace, load: Callable, run: Callable) -> int:
    """Load ``command``'s config (with overrides) and run it."""
    result = run(load(args.config, args.overrides))
    print(f"[{command}] done: {json.dumps(result)}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from basque_jax.sample.config import load_generate_config
    from basque_jax.sample.magpie import run_generate

    return _run_job("generate", args, load_generate_config, run_generate)


def _cmd_translate(args: argparse.Namespace) -> int:
    from basque_jax.sample.config import load_translate_config
    from basque_jax.sample.translate import run_translate

    return _run_job("translate", args, load_translate_config, run_translate)


def _cmd_filter(args: argparse.Namespace) -> int:
    from basque_jax.errors import UserError
    from basque_jax.sample.filters import FilterConfig, filter_files
    from basque_jax.yaml_config import apply_overrides, build, load_yaml_config

    paths = [p for p in args.paths if not _OVERRIDE.match(p)]
    overrides = [p for p in args.paths if _OVERRIDE.match(p)] + args.overrides
    if len(paths) < 2:
        raise UserError("give at least one input and the output path")
    *inputs, output = paths
    if args.config:
        cfg = load_yaml_config(FilterConfig, args.config, overrides, section="filters")
    else:
        cfg = build(FilterConfig, apply_overrides({}, overrides), "filters")
    report = filter_files(inputs, output, cfg, args.report)
    print(json.dumps({k: report[k] for k in ("input", "kept", "removed")}))
    return 0
