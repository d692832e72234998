"""``basque-jax arena serve``: the page, an admin export and a health check on one server.

Routes: ``/`` the Gradio page; ``GET /healthz`` ``{"status": "ok", "votes": N}``;
``GET /admin/export`` every vote as JSONL, for the admin token given as ``?token=`` or as
``Authorization: Bearer TOKEN`` (403 otherwise, and always when no token is configured).
Gradio's telemetry is off (``analytics_enabled=False``).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator

import gradio as gr
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from basque_jax.arena.config import ArenaConfig
from basque_jax.arena.page import build_page
from basque_jax.arena.rounds import Arena
from basque_jax.arena.sources import jsonl_lines

log = logging.getLogger(__name__)


def _token_of(request: Request) -> str:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.query_params.get("token", "")


def build_app(arena: Arena, admin_token: str | None) -> FastAPI:
    """The FastAPI app with the page mounted at ``/``."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        arena.start()
        try:
            yield
        finally:
            arena.stop()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "votes": arena.store.count()}

    @app.get("/admin/export")
    def export(request: Request):
        given = _token_of(request)
        if not admin_token or not hmac.compare_digest(given.encode(), admin_token.encode()):
            return JSONResponse({"error": "forbidden: a valid admin token is required"},
                                status_code=403)
        return StreamingResponse(jsonl_lines(arena.store), media_type="application/x-ndjson",
                                 headers={"Content-Disposition":
                                          'attachment; filename="arena_votes.jsonl"'})

    demo = build_page(arena)
    demo.max_threads = 2 * arena.config.concurrency + 8  # queue slots and worker threads
    demo.queue(default_concurrency_limit=arena.config.concurrency)
    return gr.mount_gradio_app(app, demo, path="/", run_history=False, footer_links=[],
                               show_error=False)


def serve(config: ArenaConfig) -> None:
    """Run the arena until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    token = config.resolved_admin_token()
    arena = Arena(config)
    log.info("arena: %d models (%s pairing), votes in %s, admin export %s", len(arena.models),
             config.pairing, arena.store.safe_url, "enabled" if token else "disabled")
    log.info("arena: serving on http://%s:%d/", config.host, config.port)
    uvicorn.run(build_app(arena, token), host=config.host, port=config.port, log_level="warning")
