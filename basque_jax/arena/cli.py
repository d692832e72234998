"""``basque-jax arena serve | ratings | export``.

``serve CONFIG [key=value ...] [--host H] [--port P]``: the arena page (see
``basque_jax.arena.config``).
``ratings VOTES --out FILE.json [--plot FILE.png] [--bootstrap N] [--seed S] [--ci C] [--k K]``:
Bradley-Terry ratings with bootstrap intervals and the online Elo (``basque_jax.arena.ratings``).
``export VOTES OUT.jsonl|OUT.parquet``: every stored vote.
VOTES: a vote database (SQLite file or SQLAlchemy URL), or for ratings also a JSONL/Parquet file
of ``{"model_a", "model_b", "winner"}``. A user mistake prints ``basque-jax arena: message`` and
exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from basque_jax.errors import UserError

Command = Callable[[argparse.Namespace], int]


def add_arena_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("arena", help="human-preference arena: serve the page, rate, export",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = p.add_subparsers(dest="arena_command", required=True)

    serve = cmds.add_parser("serve", help="serve the arena page (Gradio) for blind votes")
    serve.add_argument("config", help="arena YAML config (models, database, admin token...)")
    serve.add_argument("overrides", nargs="*", help="key=value overrides, e.g. pairing=adaptive")
    serve.add_argument("--host", default=None, help="address to listen on (config: host)")
    serve.add_argument("--port", type=int, default=None, help="port (config: port)")
    serve.set_defaults(func=_guarded(_cmd_serve))

    ratings = cmds.add_parser("ratings", help="Bradley-Terry ratings with bootstrap intervals")
    ratings.add_argument("votes", help="vote database (file or URL), or .jsonl/.parquet votes")
    ratings.add_argument("--out", required=True, help="output JSON file")
    ratings.add_argument("--plot", default=None, help="also write a PNG of the ratings")
    ratings.add_argument("--bootstrap", type=int, default=1000,
                         help="bootstrap resamples for the intervals (default 1000; 0: none)")
    ratings.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    ratings.add_argument("--ci", type=float, default=0.95,
                         help="interval coverage (default 0.95; the study reported 0.90)")
    ratings.add_argument("--k", type=float, default=4.0, help="online Elo K (default 4)")
    ratings.set_defaults(func=_guarded(_cmd_ratings))

    export = cmds.add_parser("export", help="export every stored vote as JSONL or Parquet")
    export.add_argument("votes", help="vote database (SQLite file or SQLAlchemy URL)")
    export.add_argument("out", help="OUT.jsonl or OUT.parquet")
    export.set_defaults(func=_guarded(_cmd_export))


def _cmd_serve(args: argparse.Namespace) -> int:
    from basque_jax.arena.config import load_arena_config

    flags = [f"{key}={value}" for key, value in (("host", args.host), ("port", args.port))
             if value is not None]
    config = load_arena_config(args.config, [*args.overrides, *flags])
    from basque_jax.arena.server import serve

    serve(config)
    return 0


def _cmd_ratings(args: argparse.Namespace) -> int:
    from basque_jax.arena.ratings import compute_ratings
    from basque_jax.arena.sources import read_outcomes

    if args.bootstrap < 0:
        raise UserError(f"--bootstrap: must be >= 0, got {args.bootstrap}")
    if not 0 < args.ci < 1:
        raise UserError(f"--ci: must be in (0, 1), got {args.ci}")
    outcomes = read_outcomes(args.votes)
    if not outcomes.votes:
        raise UserError(f"{args.votes}: no votes to rate")
    report = compute_ratings(outcomes.votes, bootstrap=args.bootstrap, ci=args.ci,
                             seed=args.seed, k=args.k)
    report["source"] = outcomes.source
    report["skipped_self_pairs"] = outcomes.skipped_self_pairs
    Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if args.plot:
        from basque_jax.arena.plot import plot_ratings

        plot_ratings(report, args.plot)
    for warning in report["warnings"]:
        print(f"basque-jax arena: warning: {warning}", file=sys.stderr)
    top = report["models"][0]
    print(json.dumps({"out": args.out, "plot": args.plot, "votes": report["votes"],
                      "models": len(report["models"]), "top": top["name"],
                      "top_rating": top["rating"]}))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from basque_jax.arena.sources import export_votes

    count = export_votes(args.votes, args.out)
    print(json.dumps({"out": args.out, "votes": count}))
    return 0


def _guarded(command: Command) -> Command:
    """``command`` with a UserError turned into one line on stderr and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(command(args) or 0)
        except UserError as e:
            print(f"basque-jax arena: {e}", file=sys.stderr)
            return 2

    return run


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m basque_jax.arena ...``: the arena commands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="basque-jax")
    add_arena_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["arena", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
