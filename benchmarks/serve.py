"""Requests/s and tokens/s of ``basque-jax serve`` vs transformers ``generate`` behind the same
HTTP layer, at 1, 8 and 32 concurrent clients.

Both servers are real processes running ``basque_jax.serve.app.build_app`` (same FastAPI
routes, request validation, chat template, detokenization, JSON responses) over the same model
(default: SmolLM2-135M-Instruct, float32) and differ only in the batching loop behind it:

* ours: ``python -m basque_jax.serve MODEL`` -- the continuous-batching sampler (a request
  joins the running batch after at most ``--chunk-steps`` decode steps; a finished row's slot
  is refilled at once);
* baseline (``--baseline-server``): a worker thread that takes every request waiting (up to
  ``--batch-size``), left-pads them into one batch and calls transformers' ``generate`` (KV
  cache, greedy); requests arriving meanwhile wait for the whole batch, whose rows all run
  until the longest ends (dynamic batching, as in the ``transformers`` pipelines or TGI before
  continuous batching).

Clients (the ``openai`` client, ``AsyncOpenAI``) send chat requests over a fixed list of
Basque / English questions, greedy, ``max_tokens`` ``--max-tokens``, stopping at the model's
end of turn, each client sending its next request when the last one is answered. At each
concurrency level both servers first run the level once untimed (our compiles of its decode
windows and prompt widths, torch's first batches), then the timed runs alternate between the
two servers (same machine load); each prints one JSON line and a summary
line gives the ratios and how many answers were identical on both sides.

    python benchmarks/serve.py [--model smollm2-135m-instruct --concurrency 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Zer da euskara?", "Nola esaten da 'thank you' euskaraz?", "Idatzi esaldi bat mendiei buruz.",
    "Zein da Euskal Herriko hiriburua?", "What is the capital of the Basque Country?",
    "Give me three tips to learn a new language.", "Explain photosynthesis in one sentence.",
    "Write a haiku about the sea.", "Zenbat egun ditu urte batek?", "What is 12 times 7?",
    "Name three colours in Basque.", "Why is the sky blue?", "Kontatu ipuin labur bat.",
    "What does a tokenizer do?", "Describe Bilbao in two sentences.", "Zer da maitasuna?",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16, help="rows per batch, both sides")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--chunk-steps", type=int, default=8)
    p.add_argument("--baseline-server", action="store_true",
                   help="(internal) run the transformers server on --port")
    p.add_argument("--port", type=int, default=0)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- baseline
class GenerateWorker:
    """The baseline's batching loop: everything waiting, one padded ``generate`` call."""

    def __init__(self, model: Any, batch_size: int, pad_id: int) -> None:
        self.model, self.batch_size, self.pad_id = model, batch_size, pad_id
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.active = self.served = 0
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.inbox.put(None)

    def submit(self, jobs) -> None:
        for job in jobs:
            self.inbox.put(job)

    def stats(self) -> dict[str, int]:
        return {"active": self.active, "queued": self.inbox.qsize(), "served": self.served}

    def _loop(self) -> None:
        while (job := self.inbox.get()) is not None:
            jobs = [job]
            while len(jobs) < self.batch_size:
                try:
                    jobs.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            jobs = [j for j in jobs if j is not None and not j.cancelled]
            self.active = len(jobs)
            for j, completion in zip(jobs, self._generate([j.request for j in jobs]),
                                     strict=True):
                j.finish(completion)
            self.served += len(jobs)
            self.active = 0

    def _generate(self, requests) -> list:
        import torch

        from basque_jax.sample.sampler import Completion

        width = max(len(r.prompt) for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt):] = 1
        p = requests[0].params  # the benchmark sends one sampling setting
        sampling = {"do_sample": True, "temperature": p.temperature, "top_p": p.top_p} \
            if p.temperature > 0 else {"do_sample": False}
        stops = list(p.stop_ids)
        with torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=mask, max_new_tokens=max(r.params.max_new_tokens
                                                             for r in requests),
                eos_token_id=stops or None, pad_token_id=self.pad_id, **sampling)
        completions = []
        for i, r in enumerate(requests):
            new = out[i, width:width + r.params.max_new_tokens].tolist()
            cut = next((k for k, t in enumerate(new) if t in stops), None)
            completions.append(Completion(new, "length") if cut is None else
                               Completion(new[:cut], "stop", new[cut]))
        return completions


def baseline_server(args: argparse.Namespace) -> int:
    import torch
    import uvicorn
    from transformers import AutoModelForCausalLM

    from basque_jax.data.templates import make_chat_encoder
    from basque_jax.data.tokenizer import load_tokenizer
    from basque_jax.errors import UserError
    from basque_jax.model.gguf import model_path
    from basque_jax.serve.app import build_app
    from basque_jax.serve.models import ServedModel

    folder = model_path(args.model)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(folder)

    def check(request) -> None:
        if len(request.prompt) + request.params.max_new_tokens > args.max_len:
            raise UserError(f"prompt + max_new_tokens exceeds max_len {args.max_len}")

    pad = hf.generation_config.pad_token_id
    worker = GenerateWorker(hf, args.batch_size, 0 if pad is None else int(pad))
    served = ServedModel(name="model", tokenizer=tokenizer,
                         encoder=make_chat_encoder(tokenizer, "auto"), worker=worker,
                         max_len=args.max_len, check=check, source=str(folder))
    uvicorn.run(build_app([served]), host="127.0.0.1", port=args.port, log_level="warning")
    return 0


# ----------------------------------------------------------------------------- clients
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    from basque_jax.arena.client import wait_until_up

    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    with log.open("w") as out:
        proc = subprocess.Popen([*cmd, "--port", str(port)], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    wait_until_up(f"{url}/models", proc, log, timeout=600, what=" ".join(cmd[:4]))
    return proc, url


async def load(url: str, concurrency: int, n: int, max_tokens: int) -> dict[str, Any]:
    """``n`` requests from ``concurrency`` clients; wall time, latencies, tokens, texts."""
    import openai

    async with openai.AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0,
                                  timeout=1800) as client:
        model = (await client.models.list()).data[0].id
        todo = list(range(n))
        latencies, tokens, texts = [], 0, {}

        async def one_client() -> None:
            nonlocal tokens
            while todo:
                i = todo.pop(0)
                start = time.perf_counter()
                r = await client.chat.completions.create(
                    model=model, temperature=0, max_tokens=max_tokens,
                    messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
                latencies.append(time.perf_counter() - start)
                tokens += r.usage.completion_tokens
                texts[i] = r.choices[0].message.content

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"requests": n, "seconds": round(wall, 2), "requests_per_s": round(n / wall, 3),
            "completion_tokens_per_s": round(tokens / wall, 1),
            "mean_completion_tokens": round(tokens / n, 1),
            "latency_p50_s": round(statistics.median(latencies), 2),
            "latency_max_s": round(max(latencies), 2), "texts": texts}


def requests_at(concurrency: int) -> int:
    """Requests sent at one concurrency level: every client sends at least one, four at
    the least in all (the CPU time budget of one run)."""
    return max(4, concurrency)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.baseline_server:
        return baseline_server(args)
    levels = [int(x) for x in args.concurrency.split(",")]
    flags = ["--batch-size", str(args.batch_size), "--max-len", str(args.max_len)]
    with tempfile.TemporaryDirectory() as tmp:
        servers = {
            "basque_jax": launch([sys.executable, "-m", "basque_jax.serve", args.model, "--name",
                                  "model", "--chunk-steps", str(args.chunk_steps),
                                  "--log-level", "warning", *flags], Path(tmp) / "ours.log"),
            "hf_generate": launch([sys.executable, __file__, "--baseline-server", "--model",
                                   args.model, *flags], Path(tmp) / "hf.log"),
        }
        try:
            rows: dict[int, dict[str, dict]] = {}
            for c in levels:
                n = requests_at(c)
                for _name, (_proc, url) in servers.items():  # compiles, first batches
                    asyncio.run(load(url, c, n, args.max_tokens))
                for name, (_proc, url) in servers.items():
                    result = asyncio.run(load(url, c, n, args.max_tokens))
                    rows.setdefault(c, {})[name] = result
                    shown = {k: v for k, v in result.items() if k != "texts"}
                    print(json.dumps({"benchmark": "serve", "server": name, "concurrency": c,
                                      "model": args.model, **shown,
                                      "load_avg_1m": round(os.getloadavg()[0], 2)}),
                          flush=True)
        finally:
            for proc, _url in servers.values():
                proc.terminate()
                proc.wait(timeout=60)
    ratio = {c: round(r["basque_jax"]["completion_tokens_per_s"]
                      / r["hf_generate"]["completion_tokens_per_s"], 2) for c, r in rows.items()}
    same = {c: sum(r["basque_jax"]["texts"][i] == r["hf_generate"]["texts"][i]
                   for i in r["basque_jax"]["texts"]) for c, r in rows.items()}
    print(json.dumps({"benchmark": "serve", "baseline": "transformers.generate, dynamic "
                      "batching, behind the same FastAPI app", "model": args.model,
                      "batch_size": args.batch_size, "max_tokens": args.max_tokens,
                      "tokens_per_s_ratio_by_concurrency": ratio,
                      "identical_answers_by_concurrency": same,
                      "requests_by_concurrency": {c: requests_at(c) for c in rows},
                      "cpus": os.cpu_count()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
