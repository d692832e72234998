"""``basque-jax eval MODEL (--tasks T1,T2 | --suite latxa | --perplexity [DATA ...]) ...``.

``--tasks`` / ``--suite``: lm-evaluation-harness on the model (``basque_jax`` backend), results
written as ``lm_eval --output_path FILE.json`` writes them and printed as lm-eval's table.
``--perplexity``: held-out perplexity through the training data pipeline, as JSON.
Task names, files and data sets are checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from basque_jax.errors import UserError


def _limit(text: str) -> int | float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return int(value) if value >= 1 and value == int(value) else value


def _flag(text: str) -> bool:
    return text.lower() in ("true", "1", "yes")


def parse_mesh(text: str | None):
    """``data=-1,fsdp=1`` → a MeshConfig (None stays None)."""
    if text is None:
        return None
    from basque_jax.sharding import MeshConfig
    from basque_jax.yaml_config import build

    sizes = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        if not eq or not value.strip().lstrip("-").isdigit():
            raise UserError(f"--mesh {text}: expected AXIS=N pairs, e.g. data=-1,fsdp=1")
        sizes[key.strip()] = int(value)
    return build(MeshConfig, sizes, "mesh")


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    from basque_jax.distributed import add_arguments as add_distributed_arguments

    p = sub.add_parser(
        "eval", help="lm-eval benchmarks (--tasks / --suite latxa) or held-out perplexity",
        description="MODEL: a Hugging Face folder or model name, a training output dir / "
        "DIR/checkpoints/STEP (LoRA unmerged), or a YAML run config (its latest checkpoint, "
        "else its initial model).")
    p.add_argument("model", help="HF folder, training output dir, checkpoint or YAML run config")
    p.add_argument("overrides", nargs="*", help="key=value overrides (YAML config only)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: the model's, or its export's for a run)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    p.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                   help="placement, e.g. data=-1,fsdp=1 (default: FSDP over all devices, or "
                   "the run config's mesh)")
    p.add_argument("--out", default=None, help="write the results JSON here")
    lm = p.add_argument_group("lm-evaluation-harness")
    lm.add_argument("--tasks", default=None,
                    help="comma-separated lm-eval task names, globs or YAML files")
    lm.add_argument("--suite", default=None, choices=("latxa",),
                    help="the Latxa Instruct study's tasks (5-shot, bbq 4, chat template, "
                    "few-shot as multi-turn)")
    lm.add_argument("--include-path", action="append", default=[], metavar="DIR",
                    help="folder of task YAMLs (repeatable)")
    lm.add_argument("--num-fewshot", type=int, default=None,
                    help="few-shot examples (default: the task's / the suite's)")
    lm.add_argument("--apply-chat-template", action=argparse.BooleanOptionalAction,
                    default=None, help="prompt through the chat template (the suite: on)")
    lm.add_argument("--fewshot-as-multiturn", type=_flag, nargs="?", const=True, default=None,
                    metavar="BOOL", help="few-shot examples as chat turns (default: on with "
                    "the chat template)")
    lm.add_argument("--system-instruction", default=None, help="system message / prefix")
    lm.add_argument("--limit", type=_limit, default=None,
                    help="documents per task (a fraction if < 1)")
    lm.add_argument("--gen-kwargs", default=None,
                    help="generation overrides, e.g. temperature=0.6,top_p=0.9,do_sample=true")
    lm.add_argument("--max-length", type=int, default=None,
                    help="longest scored row (default: max_position_embeddings)")
    lm.add_argument("--add-bos-token", action=argparse.BooleanOptionalAction, default=None,
                    help="override the tokenizer's BOS behaviour (as lm-eval's hf backend)")
    lm.add_argument("--bootstrap-iters", type=int, default=100000,
                    help="bootstrap iterations for stderr (0: none; default 100000)")
    lm.add_argument("--log-samples", action="store_true",
                    help="also write per-sample logs samples_<task>_<date>.jsonl next to --out")
    ppl = p.add_argument_group("perplexity")
    ppl.add_argument("--perplexity", nargs="*", metavar="DATA", default=None,
                     help="files to score (no value: the run config's eval_data)")
    ppl.add_argument("--data-kind", default="corpus", choices=("corpus", "chat", "instruction"),
                     help="record format of the --perplexity files (default corpus)")
    ppl.add_argument("--seq-len", type=int, default=2048, help="packed row length (default 2048)")
    ppl.add_argument("--max-batches", type=int, default=None, help="stop after N batches")
    add_distributed_arguments(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    modes = [m for m in ("tasks", "suite", "perplexity") if getattr(args, m) is not None]
    if not modes:
        raise UserError("nothing to do; pass --tasks, --suite or --perplexity")
    if len(modes) > 1:
        raise UserError(f"choose one of --tasks, --suite and --perplexity (got "
                        f"{' and '.join('--' + m for m in modes)})")
    if args.perplexity is not None:
        results = run_perplexity(args)
        text = json.dumps(results, indent=2, ensure_ascii=False)
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
        return 0
    run_lm_eval(args)
    return 0


def run_lm_eval(args: argparse.Namespace) -> dict:
    """The lm-eval tasks ``args`` ask for (checked before the model loads); prints the table
    and writes ``--out`` on process 0. Returns the results."""
    import jax

    from basque_jax.eval.tasks import (
        LATXA_PRESENT,
        evaluate_tasks,
        expand_specs,
        load_tasks,
        results_table,
        suite_specs,
        task_manager,
        write_results,
    )

    if args.out and not args.out.endswith(".json"):
        raise UserError(f"--out {args.out}: give a FILE.json")
    if args.log_samples and not args.out:
        raise UserError("--log-samples needs --out FILE.json")
    mesh = parse_mesh(args.mesh)
    chat = args.apply_chat_template
    chat = (args.suite is not None) if chat is None else chat
    if args.fewshot_as_multiturn and not chat:
        raise UserError("--fewshot-as-multiturn needs --apply-chat-template")
    if args.suite is not None:
        tm = task_manager(list(LATXA_PRESENT), args.include_path)
        specs, shots, missing = suite_specs(args.suite, tm)
    else:
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not names:
            raise UserError("--tasks: give at least one task")
        tm = task_manager(names, args.include_path)
        specs, shots, missing = expand_specs(names, tm), None, []
    tasks = load_tasks(specs, tm, shots if args.num_fewshot is None else None)

    from basque_jax.eval.harness import BasqueJaxLM

    t0 = time.perf_counter()
    lm = BasqueJaxLM(args.model, dtype=args.dtype, step=args.step, overrides=args.overrides,
                     tokenizer=args.tokenizer, mesh=mesh, batch_size=args.batch_size,
                     max_length=args.max_length, add_bos_token=args.add_bos_token)
    tracker = None
    if args.out:
        from lm_eval.loggers import EvaluationTracker

        tracker = EvaluationTracker(output_path=args.out)
    model_args = {"pretrained": lm.model.name, "dtype": args.dtype, "step": lm.model.step}
    results = evaluate_tasks(
        lm, tasks, tm=tm, num_fewshot=args.num_fewshot, limit=args.limit,
        apply_chat_template=chat, fewshot_as_multiturn=args.fewshot_as_multiturn,
        system_instruction=args.system_instruction, log_samples=args.log_samples,
        gen_kwargs=args.gen_kwargs, bootstrap_iters=args.bootstrap_iters,
        model_args={k: v for k, v in model_args.items() if v is not None},
        evaluation_tracker=tracker)
    if jax.process_index() != 0:
        return results
    if tracker is not None:
        write_results(results, tracker, args.out, log_samples=args.log_samples)
    print(results_table(results))
    if missing:
        print(f"not run (upstream lm-eval has no such task; give their YAMLs with "
              f"--include-path): {', '.join(missing)}")
    print(f"[eval] {len(results['results'])} tasks in {time.perf_counter() - t0:.1f} s"
          + (f"; results in {args.out}" if args.out else ""), file=sys.stderr)
    return results


def run_perplexity(args: argparse.Namespace) -> dict:
    """Held-out perplexity of the model over ``--perplexity`` files (or the run's eval_data)."""
    from basque_jax.eval.perplexity import evaluate_perplexity, perplexity_data
    from basque_jax.runs import load_model

    t0 = time.perf_counter()
    em = load_model(args.model, step=args.step, dtype=args.dtype, overrides=args.overrides,
                    mesh=parse_mesh(args.mesh))
    tok = em.load_tokenizer(args.tokenizer)
    tok_name = args.tokenizer or em.tokenizer
    results: dict = {"model": em.name, "step": em.step, "tokenizer": str(tok_name)}
    if args.perplexity:
        data = perplexity_data(args.perplexity, kind=args.data_kind, seq_len=args.seq_len,
                               batch_size=args.batch_size, tokenizer=str(tok_name))
    elif em.eval_data is not None:
        data = em.eval_data
    else:
        raise UserError("--perplexity without files needs a run config with eval_data")
    results["perplexity"] = evaluate_perplexity(em.model, data, tok, max_batches=args.max_batches,
                                                mesh=em.mesh, rules=em.rules)
    results["seconds"] = round(time.perf_counter() - t0, 2)
    return results
