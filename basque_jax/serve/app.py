"""The OpenAI-compatible HTTP API of ``basque-jax serve`` (FastAPI).

Routes: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/chat/completions``,
``POST /v1/completions`` -- JSON, or with ``"stream": true`` server-sent events in OpenAI's
chunk format ending in ``data: [DONE]`` -- and ``GET /health`` (per-model active / queued /
served row counts). Every error is OpenAI's body ``{"error": {"message", "type", "param",
"code"}}``: 400 for a bad request, 401 for a wrong API key, 404 for an unknown model or route,
500 (traceback in the server log) for a bug. A request whose client disconnects is cancelled:
its rows leave the batch after the current decode chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from basque_jax.errors import UserError
from basque_jax.sample.sampler import Request
from basque_jax.sample.sampling import SamplingParams
from basque_jax.serve.engine import Channel, Job
from basque_jax.serve.models import ServedModel
from basque_jax.serve.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    parse_body,
)
from basque_jax.serve.text import TextStream

DISCONNECT_POLL_S = 0.5  # a non-streaming request checks this often whether its client left


class Shape:
    """How one endpoint writes choices: ``chat`` (message / delta) or ``text`` (completions)."""

    def __init__(self, kind: str, model: str) -> None:
        self.kind, self.model = kind, model
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.include_usage = False

    def _envelope(self, obj: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **extra}

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None,
              first: bool = False) -> str:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": text or ""} if first else \
                ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": index, "text": text or "", "logprobs": None,
                      "finish_reason": finish_reason}
            obj = "text_completion"
        extra = {"usage": None} if self.include_usage else {}
        return sse(self._envelope(obj, [choice], **extra))

    def usage_chunk(self, usage: dict[str, int]) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return sse(self._envelope(obj, [], usage=usage))

    def response(self, texts: dict[int, str], reasons: dict[int, str],
                 usage: dict[str, int]) -> dict[str, Any]:
        choices = []
        for i in sorted(texts):
            if self.kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": texts[i],
                                                        "refusal": None},
                                "logprobs": None, "finish_reason": reasons[i]})
            else:
                choices.append({"index": i, "text": texts[i], "logprobs": None,
                                "finish_reason": reasons[i]})
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return self._envelope(obj, choices, usage=usage)


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _context_error(model: ServedModel, n_prompt: int, max_new: int | None, param: str
                   ) -> APIError:
    what = "messages" if param == "messages" else "prompt"
    if max_new is None:
        msg = (f"This model's maximum context length is {model.max_len} tokens. However, your "
               f"{what} resulted in {n_prompt} tokens. Please reduce the length of the {what}.")
    else:
        msg = (f"This model's maximum context length is {model.max_len} tokens. However, you "
               f"requested {n_prompt + max_new} tokens ({n_prompt} in the {what}, {max_new} in "
               f"the completion). Please reduce the length of the {what} or completion.")
    return APIError(400, msg, param=param, code="context_length_exceeded")


def sampler_requests(model: ServedModel, req: SamplingFields, prompts: Sequence[list[int]],
                     limit: int | None, param: str) -> list[Request]:
    """``n`` sampler requests per prompt (choice ``i * n + j``), each checked; seeds are
    ``seed + choice`` when a seed is given, random otherwise."""
    n = req.n or 1
    stop_ids = () if req.ignore_eos else model.stop_ids
    out = []
    for i, prompt in enumerate(prompts):
        max_new = limit if limit is not None else model.max_len - len(prompt)
        if max_new < 1 or len(prompt) + max_new > model.max_len:
            raise _context_error(model, len(prompt), limit, param)
        params = SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=max(0, req.top_k or 0), top_p=1.0 if req.top_p is None else req.top_p,
            min_p=req.min_p or 0.0, max_new_tokens=max_new, stop_ids=stop_ids)
        for j in range(n):
            seed = secrets.randbits(32) if req.seed is None else (req.seed + i * n + j) % 2**32
            request = Request(prompt, params, seed)
            try:
                model.check(request)
            except UserError as e:
                raise APIError(400, f"Invalid value for '{param}': {e}", param=param,
                               code="invalid_value") from None
            out.append(request)
    return out


async def _stream(shape: Shape, model: ServedModel, channel: Channel, jobs: list[Job],
                  prompt_tokens: int) -> AsyncIterator[str]:
    try:
        model.worker.submit(jobs)
        for job in jobs:
            if shape.kind == "chat" or job.prompt_text:
                yield shape.chunk(job.index, job.prompt_text, first=True)
        remaining, generated = len(jobs), 0
        while remaining:
            event = await channel.queue.get()
            if event.kind == "error":
                yield sse(APIError(500, event.text, type="server_error").body())
                return
            if event.kind == "delta":
                yield shape.chunk(event.index, event.text)
            else:
                remaining -= 1
                generated += event.completion_tokens
                yield shape.chunk(event.index, None, event.finish_reason)
        if shape.include_usage:
            yield shape.usage_chunk(_usage(prompt_tokens, generated))
        yield "data: [DONE]\n\n"
    finally:
        channel.cancel()  # the client left (or all rows are done): stop what still runs


async def _collect(http: HTTPRequest, shape: Shape, model: ServedModel, channel: Channel,
                   jobs: list[Job], prompt_tokens: int) -> Response:
    texts = {job.index: job.prompt_text for job in jobs}
    reasons: dict[int, str] = {}
    generated = 0
    try:
        model.worker.submit(jobs)
        while len(reasons) < len(jobs):
            try:
                event = await asyncio.wait_for(channel.queue.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if await http.is_disconnected():
                    return Response(status_code=499)  # nobody reads it
                continue
            if event.kind == "error":
                raise APIError(500, event.text, type="server_error")
            if event.kind == "delta":
                texts[event.index] += event.text
            else:
                reasons[event.index] = event.finish_reason or "stop"
                generated += event.completion_tokens
    finally:
        channel.cancel()
    return JSONResponse(shape.response(texts, reasons, _usage(prompt_tokens, generated)))


def build_app(models: Sequence[ServedModel], *, api_key: str | None = None) -> FastAPI:
    """The API over ``models`` (their workers start and stop with the app)."""
    registry = {m.name: m for m in models}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        for m in models:
            m.worker.start()
        try:
            yield
        finally:
            for m in models:
                m.worker.stop()

    app = FastAPI(title="basque-jax serve", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(_request: HTTPRequest, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request: HTTPRequest, e: HTTPException) -> JSONResponse:
        error = APIError(e.status_code, str(e.detail), code=None)
        return JSONResponse(error.body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(_request: HTTPRequest, _e: Exception) -> JSONResponse:
        error = APIError(500, "internal server error (see the server log)", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.middleware("http")
    async def authorize(request: HTTPRequest, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            given = given[7:].strip() if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                error = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    def lookup(name: str) -> ServedModel:
        model = registry.get(name)
        if model is None:
            raise APIError(404, f"The model `{name}` does not exist (served: "
                           f"{', '.join(registry)}).", param="model", code="model_not_found")
        return model

    def card(m: ServedModel) -> dict[str, Any]:
        return {"id": m.name, "object": "model", "created": m.created, "owned_by": "basque-jax",
                "root": m.source, "max_model_len": m.max_len}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": {m.name: m.worker.stats() for m in models}}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [card(m) for m in models]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        return card(lookup(name))

    async def respond(http: HTTPRequest, shape: Shape, model: ServedModel, req: SamplingFields,
                      requests: list[Request], prompt_tokens: int,
                      echoed: Sequence[str] = ()) -> Response:
        """Run ``requests`` (``n`` per prompt, in order); ``echoed``: each prompt's text,
        sent before its choices' completions."""
        stops = req.stop_strings()
        channel = Channel(asyncio.get_running_loop())
        n = req.n or 1
        jobs = [Job(r, i, TextStream(model.tokenizer, stops), channel,
                    echoed[i // n] if echoed else "") for i, r in enumerate(requests)]
        if req.stream:
            shape.include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(shape, model, channel, jobs, prompt_tokens),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        return await _collect(http, shape, model, channel, jobs, prompt_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest) -> Response:
        req = parse_body(await http.body(), ChatCompletionRequest)
        model = lookup(req.model)
        messages = [("system" if m.role == "developer" else m.role, m.text())
                    for m in req.messages]
        try:
            prompt = model.encode_chat(messages)
        except UserError as e:
            raise APIError(400, f"Invalid value for 'messages': {e}", param="messages",
                           code="invalid_value") from None
        requests = sampler_requests(model, req, [prompt], req.token_limit, "messages")
        return await respond(http, Shape("chat", model.name), model, req, requests,
                             len(prompt))

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest) -> Response:
        req = parse_body(await http.body(), CompletionRequest)
        model = lookup(req.model)
        prompts = [model.encode_prompt(p) if isinstance(p, str) else list(p)
                   for p in req.prompts()]
        requests = sampler_requests(model, req, prompts, req.max_tokens, "prompt")
        echoed = [p if isinstance(p, str) else model.tokenizer.decode(p)
                  for p in req.prompts()] if req.echo else []
        return await respond(http, Shape("text", model.name), model, req, requests,
                             sum(map(len, prompts)), echoed)

    return app
