"""Test double: a tiny OpenAI-compatible chat server with deterministic, slowly streamed answers.

It speaks the real wire format (``GET /v1/models``; ``POST /v1/chat/completions`` as JSON or as
server-sent ``chat.completion.chunk`` events ending in ``data: [DONE]``), so the official
``openai`` client parses it exactly as it parses vLLM or ``basque-jax serve``.

Every answer names the model that wrote it (``<alpha>`` ...), so a test can check that an answer
is shown, and its vote attributed, under the right model. The model id ``stub-error`` answers
HTTP 500. Run in a thread (:func:`serve_in_thread`) or as a process:
``python tests/_openai_stub.py PORT [--models alpha,beta] [--delay 0.05] [--tokens 12]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

WORDS = ["Kaixo", "mundua", "euskara", "hizkuntza", "ederra", "da", "eta", "gaur", "eguna",
         "ona", "izango", "dugu", "bai", "ez", "agian", "beti"]
ERROR_MODEL = "stub-error"


def answer_tokens(model: str, prompt: str, n_tokens: int) -> list[str]:
    """The deterministic answer of ``model`` to ``prompt``, as streamed pieces."""
    digest = hashlib.sha256(f"{model}\n{prompt}".encode()).digest()
    words = [WORDS[b % len(WORDS)] for b in digest[: n_tokens - 1]]
    return [f"<{model}>"] + [f" {w}" for w in words]


def make_app(models: list[str], delay_s: float = 0.01, n_tokens: int = 12) -> FastAPI:
    app = FastAPI()
    app.state.requests = 0

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "stub"} for m in models]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.requests += 1
        model = body.get("model")
        if model == ERROR_MODEL:
            return JSONResponse({"error": {"message": "stub failure", "type": "server_error"}},
                                status_code=500)
        if model not in models:
            return JSONResponse({"error": {"message": f"model {model!r} not found",
                                           "type": "invalid_request_error"}}, status_code=404)
        prompt = next((m["content"] for m in reversed(body["messages"])
                       if m["role"] == "user"), "")
        tokens = answer_tokens(model, prompt, n_tokens)
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        finish = "stop"
        if limit is not None and limit < len(tokens):
            tokens, finish = tokens[:limit], "length"
        created = int(time.time())
        cid = f"chatcmpl-stub{app.state.requests}"
        if not body.get("stream"):
            return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "finish_reason": finish, "logprobs": None,
                                 "message": {"role": "assistant", "content": "".join(tokens)}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": len(tokens),
                              "total_tokens": 1 + len(tokens)}}

        def chunk(delta: dict, finish_reason: str | None) -> str:
            payload = {"id": cid, "object": "chat.completion.chunk", "created": created,
                       "model": model, "system_fingerprint": None,
                       "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                    "finish_reason": finish_reason}]}
            return f"data: {json.dumps(payload)}\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""}, None)
            for tok in tokens:
                await asyncio.sleep(delay_s)
                yield chunk({"content": tok}, None)
            yield chunk({}, finish)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(models: list[str], delay_s: float = 0.01,
                    n_tokens: int = 12) -> Iterator[str]:
    """Run the stub on a free localhost port; yields its base URL (``http://.../v1``)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(models, delay_s, n_tokens), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="openai-stub")
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the OpenAI stub did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("--models", default="alpha,beta")
    parser.add_argument("--delay", type=float, default=0.01, help="seconds between tokens")
    parser.add_argument("--tokens", type=int, default=12)
    args = parser.parse_args()
    uvicorn.run(make_app(args.models.split(","), args.delay, args.tokens), host="127.0.0.1",
                port=args.port, log_level="warning")
