"""``basque-jax serve MODEL [MODEL ...]``: an OpenAI-compatible server on the sampler.

Each MODEL is anything ``basque_jax.runs.load_model`` takes (Hugging Face folder, named model
such as ``smollm2-135m-instruct``, training run dir -- LoRA adapters unmerged unless
``--merge-lora`` --, ``RUN/checkpoints/STEP``, run config). ``--name`` gives the model ids
clients request, one per model in order (default: the named model, the folder's name, or
``RUN-stepN``). One process, one continuous-batching loop per model; nothing here joins a
multi-host group (serve on one host).

    basque-jax serve smollm2-135m-instruct runs/demo/train --name base --name basque-lora
    curl localhost:8000/v1/chat/completions -d '{"model": "base", "messages": [...]}'
"""

from __future__ import annotations

import argparse
import logging
import os
import time

from basque_jax.cache import enable_compilation_cache
from basque_jax.errors import ConfigError, MissingDependency

log = logging.getLogger("basque_jax.serve")


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``basque-jax serve``."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat and completions, "
                       "streaming) with continuous batching", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="HF folder, named model, training run dir, RUN/checkpoints/STEP")
    p.add_argument("--name", action="append", default=[], metavar="NAME",
                   help="model id for the API, once per model in order")
    p.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="rows decoded together per model (default 16)")
    p.add_argument("--max-len", type=int, default=2048,
                   help="prompt + completion tokens per row at most (default 2048)")
    p.add_argument("--chunk-steps", type=int, default=8,
                   help="decode steps between stream updates and batch refills (default 8)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: the model's; bfloat16 on TPU/GPU)")
    p.add_argument("--cache-dtype", default=None, help="KV cache dtype (default: --dtype)")
    p.add_argument("--tensor", type=int, default=1,
                   help="tensor-parallel devices per model replica (default 1)")
    p.add_argument("--merge-lora", action="store_true",
                   help="fold a run's LoRA adapters into the weights (faster decode)")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="require 'Authorization: Bearer $VAR' on /v1 routes")
    p.add_argument("--warmup", action="store_true",
                   help="compile every decode window (rows x cache length, greedy) before "
                        "serving, instead of at first use")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="compiled programs kept for restarts (default "
                        "$JAX_COMPILATION_CACHE_DIR or ~/.cache/basque_jax/xla; none: off)")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=_cmd_serve)


def _api_key(var: str | None) -> str | None:
    if var is None:
        return None
    key = os.environ.get(var)
    if not key:
        raise ConfigError(f"--api-key-env: environment variable {var} is not set")
    return key


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise MissingDependency(f"serve needs fastapi and uvicorn ({e.name} is missing): pip "
                                "install 'basque-jax[arena]'") from None
    from basque_jax.sample.sampler import SamplerConfig
    from basque_jax.serve.app import build_app
    from basque_jax.serve.models import check_unique, load_served_model, model_names

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port: must be in [1, 65535], got {args.port}")
    api_key = _api_key(args.api_key_env)
    config = SamplerConfig(batch_size=args.batch_size, max_len=args.max_len,
                           chunk_steps=args.chunk_steps, cache_dtype=args.cache_dtype)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s: %(message)s")
    cache = enable_compilation_cache(args.compile_cache)
    log.info("serve: compiled programs cached in %s", cache or "memory only")
    served = []
    for source, name in zip(args.models, model_names(args.models, args.name), strict=True):
        model = load_served_model(source, name, config, dtype=args.dtype, tensor=args.tensor,
                                  merge_lora=args.merge_lora)
        log.info("serve: %s <- %s (%s, stop ids %s)", model.name, source,
                 type(model.encoder).__name__, list(model.stop_ids))
        if args.warmup:
            t0 = time.perf_counter()
            n = model.worker.sampler.warm_up()
            log.info("serve: %s: %d decode programs ready in %.1f s", model.name, n,
                     time.perf_counter() - t0)
        served.append(model)
    check_unique(served)
    log.info("serve: http://%s:%d/v1 (batch %d, max_len %d per model)", args.host, args.port,
             args.batch_size, args.max_len)
    uvicorn.run(build_app(served, api_key=api_key), host=args.host, port=args.port,
                log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0

