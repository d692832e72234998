"""The arena on CPU: SmolLM2-135M-Instruct before and after a short Basque LoRA run, side by
side, blind, on the arena page.

1. trains (unless ``--run-dir`` gives a finished run) ``configs/demo_smollm2.yaml`` for
   ``--steps`` steps on the embedded Basque paragraphs and Q&A:
   ``basque-jax train configs/demo_smollm2.yaml vars.out=OUT train.steps=N data.sources=[...]``;
2. serves both from one process, the LoRA run with its adapters unmerged:
   ``basque-jax serve smollm2-135m-instruct OUT/train --name smollm2-base
   --name smollm2-eu-lora``;
3. writes ``OUT/arena.yaml`` pointing at both and starts ``basque-jax arena serve`` on it;
4. prints the page's address: write a prompt in Basque, read the two anonymous answers, vote,
   and see which model wrote which. Ctrl-C stops both servers.
   ``--auto-votes N`` instead plays N rounds through the page's HTTP API with the embedded
   Basque questions and votes for the answer that lingua identifies as Basque (a tie when
   both are, "both bad" when neither is), then stops;
5. prints the leaderboard: ``basque-jax arena ratings OUT/votes.db --out OUT/ratings.json``.

Measured on the project's 2 shared CPU cores: ``--auto-votes 3`` runs end to end in 2 min 36 s
(training ~1 min, both servers up ~40 s, three rounds of two 128-token answers); the judge
preferred the LoRA model's answer in all three.

    python scripts/arena_demo.py [--out runs/arena_demo] [--steps 24] [--run-dir DIR]
                                 [--auto-votes N] [--arena-port 7860] [--serve-port 8000]
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from basque_jax.arena.client import call_page, wait_until_up

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo_smollm2.yaml"
BASE = "smollm2-135m-instruct"
NAMES = ("smollm2-base", "smollm2-eu-lora")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/arena_demo", help="output folder")
    p.add_argument("--run-dir", default=None, help="a finished LoRA run on SmolLM2 to reuse")
    p.add_argument("--steps", type=int, default=24, help="LoRA steps (default 24)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--serve-port", type=int, default=8000)
    p.add_argument("--arena-port", type=int, default=7860)
    p.add_argument("--max-tokens", type=int, default=128, help="answer length at most")
    p.add_argument("--auto-votes", type=int, default=0,
                   help="play N rounds automatically (see above), then stop")
    return p.parse_args(argv)


def run(cmd: list[str]) -> None:
    print(f"[arena-demo] $ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def train(out: Path, steps: int) -> Path:
    """The short LoRA run (the demo's config without its Magpie data)."""
    from basque_jax.demo_real import split_corpus

    split_corpus(out)
    sources = (f'data.sources=[{{kind: corpus, path: "{out}/data/corpus_train.jsonl", '
               'name: corpus}, {kind: chat, path: "@embedded/eu_sample_chat.jsonl", '
               'name: basque_chat}]')
    run([sys.executable, "-m", "basque_jax.cli", "train", str(CONFIG), f"vars.out={out}",
         f"train.steps={steps}", f"train.eval_every={steps}", "train.progress_bar=false",
         sources])
    return out / "train"


def write_arena_config(out: Path, serve_url: str, args: argparse.Namespace) -> Path:
    config = out / "arena.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "title": "SmolLM2: before and after Basque LoRA", "language": "eu",
        "models": [{"name": name, "base_url": serve_url} for name in NAMES],
        "database": "votes.db", "max_tokens": args.max_tokens, "host": args.host,
        "port": args.arena_port, "leaderboard_refresh_s": 5.0}, indent=2) + "\n")
    return config


def auto_votes(url: str, n: int) -> None:
    from basque_jax.data.embedded import EMBEDDED_CHAT
    from basque_jax.sample.filters import FilterConfig, Filters

    judge = Filters(FilterConfig(near_dedup=False))
    rows = [json.loads(line) for line in EMBEDDED_CHAT.read_text()
            .splitlines() if line.strip()]
    questions = [m["content"] for r in rows for m in r["messages"] if m["role"] == "user"]
    with httpx.Client(timeout=600) as http:
        for i in range(n):
            question = questions[i % len(questions)]
            out = call_page(http, url, "ask", [question, "arena-demo"], "arena-demo")
            answers = [html.unescape(a or "") for a in out[:2]]
            basque = [judge.is_language(a) for a in answers]
            winner = {(True, False): "a", (False, True): "b", (True, True): "tie"}.get(
                tuple(basque), "both_bad")
            reveal = call_page(http, url, f"vote_{winner}", ["arena-demo"], "arena-demo")[0]
            print(f"[arena-demo] vote {i + 1}/{n}: {question!r} -> {winner} "
                  f"({' '.join(reveal.split()[:6])} ...)", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(args.run_dir).resolve() if args.run_dir else train(out, args.steps)
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    serve_cmd = [sys.executable, "-m", "basque_jax.serve", BASE, str(run_dir),
                 "--name", NAMES[0], "--name", NAMES[1], "--host", args.host, "--port",
                 str(args.serve_port), "--batch-size", "4", "--max-len", "1024"]
    print(f"[arena-demo] $ {' '.join(serve_cmd)}", flush=True)
    serve = subprocess.Popen(serve_cmd, cwd=REPO, env=env)
    procs = [serve]
    try:
        serve_url = f"http://{args.host}:{args.serve_port}/v1"
        wait_until_up(f"{serve_url}/models", serve, timeout=900, what="basque-jax serve")
        config = write_arena_config(out, serve_url, args)
        arena_cmd = [sys.executable, "-m", "basque_jax.arena", "serve", str(config)]
        print(f"[arena-demo] $ {' '.join(arena_cmd)}", flush=True)
        arena = subprocess.Popen(arena_cmd, cwd=REPO)
        procs.append(arena)
        arena_url = f"http://{args.host}:{args.arena_port}/"
        wait_until_up(f"{arena_url}healthz", arena, timeout=300, what="the arena")
        print(f"\n[arena-demo] the arena is up: {arena_url}\n[arena-demo] write a prompt in "
              "Basque, read the two anonymous answers (streamed from basque-jax serve), vote "
              "for the better one; the page then tells you which model wrote which. The "
              "Sailkapena tab is the leaderboard.\n", flush=True)
        if args.auto_votes:
            auto_votes(arena_url, args.auto_votes)
        else:
            print("[arena-demo] Ctrl-C stops both servers and prints the ratings.", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                arena.wait()
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
    votes = out / "votes.db"
    if votes.exists():
        run([sys.executable, "-m", "basque_jax.arena", "ratings", str(votes), "--out",
             str(out / "ratings.json")])
        report = json.loads((out / "ratings.json").read_text())
        def show(x: float | None) -> str:  # None: no information on this model yet
            return "n/a" if x is None else f"{x:.0f}"

        for m in report["models"]:
            bt = "unbounded (one side won every vote)" if m["unbounded"] else \
                f"{show(m['rating'])} [{show(m['ci_low'])}, {show(m['ci_high'])}]"
            print(f"[arena-demo] {m['name']:>16}: {m['wins']} wins, {m['losses']} losses, "
                  f"{m['ties']} ties, {m['both_bad']} both bad; Bradley-Terry {bt}; "
                  f"online Elo {show(m['online_elo'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
