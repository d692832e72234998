"""``basque-jax serve``: an OpenAI-compatible HTTP API over the continuous-batching sampler.

Modules, one job each: ``schemas`` (request bodies, validation, OpenAI error bodies),
``text`` (incremental detokenization, stop strings), ``engine`` (one sampler loop per model in
a background thread, fed by a queue), ``models`` (loading and naming the served models, their
chat templates), ``app`` (the FastAPI routes, JSON and server-sent events) and ``cli``.
"""
