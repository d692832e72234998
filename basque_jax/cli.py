"""``basque-jax`` command line: one sub-command per pipeline stage.

Every command reports a user mistake (:class:`basque_jax.errors.UserError`: a config key, an
input file, a model folder) as one line ``basque-jax COMMAND: message`` on stderr and exits
with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from basque_jax.errors import UserError


def _cmd_demo(args: argparse.Namespace) -> int:
    from basque_jax.demo import run_demo

    return run_demo(args.out)


def _cmd_train(args: argparse.Namespace) -> int:
    from basque_jax.config import load_config
    from basque_jax.train.loop import TrainingDiverged, run_training
    from basque_jax.train.preemption import PREEMPTED_EXIT, Preempted

    cfg = load_config(args.config, args.overrides)
    try:
        result = run_training(cfg)
    except TrainingDiverged as e:
        print(f"basque-jax train: {e}", file=sys.stderr)
        return 3
    except Preempted as e:
        print(f"basque-jax train: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    shown = {k: round(v, 4) for k, v in result.items() if isinstance(v, float)}
    print(f"[train] finished: {shown}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from basque_jax.model.config import LlamaConfig

    if args.model.endswith(".json") or "/" in args.model:
        cfg = LlamaConfig.from_hf_file(args.model)
    else:
        cfg = LlamaConfig.preset(args.model)
    print(cfg)
    print(f"parameters: {cfg.num_parameters:,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from basque_jax.arena.cli import add_arena_parser
    from basque_jax.data.prepare_cli import add_prepare_parser
    from basque_jax.distributed import add_arguments as add_distributed_arguments
    from basque_jax.eval.cli import add_eval_parser
    from basque_jax.export.cli import add_export_parser
    from basque_jax.model.gguf import add_convert_parser
    from basque_jax.plan import add_plan_parser
    from basque_jax.sample.cli import add_sample_parsers
    from basque_jax.serve.cli import add_serve_parser

    parser = argparse.ArgumentParser(prog="basque-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the end-to-end demo on an embedded tiny default")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.set_defaults(func=_cmd_demo)
    train = sub.add_parser("train", help="train (LoRA or full fine-tuning) from a YAML config")
    train.add_argument("config", help="YAML run config (see configs/)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    train.set_defaults(func=_cmd_train)
    add_distributed_arguments(train)
    info = sub.add_parser("info", help="print a model preset or HF config and its size")
    info.add_argument("model", help="preset name (e.g. llama3.1-8b) or HF folder / config.json")
    info.set_defaults(func=_cmd_info)
    add_prepare_parser(sub)
    add_export_parser(sub)
    add_convert_parser(sub)
    add_eval_parser(sub)
    add_plan_parser(sub)
    add_sample_parsers(sub)
    add_arena_parser(sub)
    add_serve_parser(sub)
    return parser


# Commands that never join a jax.distributed group.
LOCAL_COMMANDS = ("demo", "info", "plan", "filter", "convert", "arena", "prepare", "serve")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command not in LOCAL_COMMANDS:  # multi-host: before anything touches a device
            from basque_jax.distributed import initialize

            initialize(args)
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"basque-jax {args.command}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
