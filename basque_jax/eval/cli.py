"""``basque-jax eval MODEL [--perplexity [DATA ...]] [--mc JSONL] ... [--out results.json]``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from basque_jax.errors import UserError


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="held-out perplexity and multiple-choice accuracy; results as JSON",
        description="MODEL: a YAML run config (its latest checkpoint, else its initial model), "
        "a training output dir / DIR/checkpoints/STEP, or a Hugging Face folder.")
    p.add_argument("model", help="YAML run config, training output dir, or HF folder")
    p.add_argument("overrides", nargs="*", help="key=value overrides (YAML config only)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer (HF folder, tokenizer.model, or demo); default: the model's")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    ppl = p.add_argument_group("perplexity")
    ppl.add_argument("--perplexity", nargs="*", metavar="DATA", default=None,
                     help="files to score (no value: the run config's eval_data)")
    ppl.add_argument("--data-kind", default="corpus", choices=("corpus", "chat", "instruction"),
                     help="record format of the --perplexity files (default corpus)")
    ppl.add_argument("--seq-len", type=int, default=2048, help="packed row length (default 2048)")
    ppl.add_argument("--max-batches", type=int, default=None, help="stop after N batches")
    mc = p.add_argument_group("multiple choice")
    mc.add_argument("--mc", metavar="JSONL", default=None,
                    help='{"question","choices","answer"} rows, e.g. truthfulqa_eu_mc1.jsonl')
    mc.add_argument("--num-fewshot", type=int, default=0, help="examples per prompt (default 0)")
    mc.add_argument("--chat", action="store_true", help="prompt through the chat template")
    mc.add_argument("--limit", type=int, default=None, help="only the first N items")
    mc.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed")
    mc.add_argument("--no-bos", dest="add_bos", action="store_false",
                    help="do not prepend BOS to text prompts")
    mc.add_argument("--max-length", type=int, default=None,
                    help="longest scored row (default: max_position_embeddings)")
    mc.add_argument("--log-samples", action="store_true",
                    help="include per-item log-likelihoods in the results")
    p.add_argument("--out", default=None, help="also write the results JSON here")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.perplexity is None and args.mc is None:
        raise UserError("nothing to do; pass --perplexity and/or --mc")
    results = run_eval(args)
    text = json.dumps(results, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


def run_eval(args: argparse.Namespace) -> dict:
    """The evaluations ``args`` ask for, as one results dict."""
    from basque_jax.runs import load_model

    t0 = time.perf_counter()
    em = load_model(args.model, step=args.step, dtype=args.dtype, overrides=args.overrides)
    tok = em.load_tokenizer(args.tokenizer)
    tok_name = args.tokenizer or em.tokenizer
    results: dict = {"model": em.name, "step": em.step, "tokenizer": str(tok_name)}
    if args.perplexity is not None:
        from basque_jax.eval.perplexity import evaluate_perplexity, perplexity_data

        if args.perplexity:
            data = perplexity_data(args.perplexity, kind=args.data_kind, seq_len=args.seq_len,
                                   batch_size=args.batch_size, tokenizer=str(tok_name))
        elif em.eval_data is not None:
            data = em.eval_data
        else:
            raise UserError("--perplexity without files needs a run config with eval_data")
        results["perplexity"] = evaluate_perplexity(em.model, data, tok,
                                                    max_batches=args.max_batches,
                                                    mesh=em.mesh, rules=em.rules)
    if args.mc is not None:
        from basque_jax.eval.multiple_choice import evaluate_multiple_choice, read_mc_jsonl

        items = read_mc_jsonl(args.mc, limit=args.limit)
        chat = {} if em.data is None else {"chat_template": em.data.chat_template,
                                            "system_prompt": em.data.system_prompt,
                                            "date_string": em.data.chat_date}
        mc = evaluate_multiple_choice(
            em.model, tok, items, num_fewshot=args.num_fewshot, chat=args.chat, seed=args.seed,
            add_bos=args.add_bos, batch_size=args.batch_size, max_length=args.max_length,
            mesh=em.mesh, rules=em.rules, log_samples=args.log_samples, **chat)
        results["multiple_choice"] = {"file": str(args.mc), **mc}
    results["seconds"] = round(time.perf_counter() - t0, 2)
    return results
