"""Helpers of the ``basque-jax serve`` tests: a real server process, tiny chat models that fit
the demo tokenizer (with the Llama 3.1 Jinja template saved in their folder), and transformers
references for what the server should answer."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import torch
from _model_utils import make_tiny_hf, subprocess_env
from _openai_stub import free_port

from basque_jax.arena.client import wait_until_up

REPO = Path(__file__).resolve().parents[1]


def tiny_chat_model(folder: Path, seed: int = 0) -> Path:
    """A random tiny Llama (demo-tokenizer vocabulary) whose HF tokenizer carries the Llama
    3.1 chat template, so transformers' ``apply_chat_template`` is a reference prompt."""
    from basque_jax.data.templates import TEMPLATES_DIR
    from basque_jax.data.tokenizer import load_tokenizer

    make_tiny_hf(folder, seed=seed, with_tokenizer=False)
    template = (TEMPLATES_DIR / "llama31.jinja").read_text()
    load_tokenizer("demo").save(folder, chat_template=template)
    return folder


class ServeProcess:
    """``python -m basque_jax.serve ARGS`` (the ``basque-jax serve`` command) on a free port."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "basque_jax.serve", *args, "--port", str(self.port),
                 "--log-level", "warning"], cwd=REPO,
                env=subprocess_env(devices=1),  # one device: rows need no cross-device work
                stdout=out, stderr=subprocess.STDOUT)

    def wait_until_up(self, timeout: float = 240) -> ServeProcess:
        wait_until_up(f"{self.base_url}/models", self.proc, self.log, timeout, "serve")
        return self

    def health(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


@contextlib.contextmanager
def served(args: list[str], log: Path):
    """A running ``basque-jax serve ARGS``, stopped on exit."""
    proc = ServeProcess(args, log)
    try:
        yield proc.wait_until_up()
    finally:
        proc.stop()


def openai_client(server: ServeProcess, timeout: float) -> openai.OpenAI:
    """The official client on ``server`` (no retries: a failure shows at once)."""
    return openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0,
                         timeout=timeout)


def hf_chat_reference(model, hf_tokenizer, messages: list[dict], max_new_tokens: int,
                      stop_ids: list[int]) -> tuple[list[int], str, str]:
    """transformers' prompt (``apply_chat_template``), its greedy ``generate`` text (special
    tokens skipped) and the finish reason OpenAI would report."""
    prompt = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=True, return_dict=False)
    ids, text, reason = hf_greedy(model, hf_tokenizer, list(prompt), max_new_tokens, stop_ids)
    return list(prompt), text, reason


def hf_greedy(model, hf_tokenizer, prompt: list[int], max_new_tokens: int,
              stop_ids: list[int]) -> tuple[list[int], str, str]:
    """Greedy ``generate`` from ``prompt`` ids: new ids (stop id removed), text, reason."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                             dtype=torch.long), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=stop_ids or None, pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    reason = "length"
    if new and new[-1] in stop_ids:
        new, reason = new[:-1], "stop"
    return new, hf_tokenizer.decode(new, skip_special_tokens=True), reason
