"""`dgemma serve`: an OpenAI-compatible HTTP server with continuous batching, draft streaming and a playground.

    protocol.py  request bodies (pydantic) and the policy for each OpenAI field
    text.py      committed ids → text deltas: incremental detokenization, thought channel, stop strings
    runner.py    one request: submit to the engine thread, drain its events into asyncio
    metrics.py   Prometheus metrics
    app.py       the FastAPI routes, SSE formatting, errors, API key, the playground's static files
    static/      the playground (no CDN: works offline)
"""

from __future__ import annotations

from dgemma.api import LLM


def build_app(llm: LLM, *, model_name: str = "default", api_key: str | None = None, max_batch: int = 16,
              max_model_len: int | None = None, prefix_cache: bool = True):
    """The ready-to-run app for a loaded `LLM`; the scheduler starts with the app (its lifespan)."""
    from dgemma.engine.scheduler import Scheduler
    from dgemma.serve.app import ServerConfig, create_app
    from dgemma.serve.metrics import ServerMetrics
    from dgemma.serve.protocol import MAX_STABILITY

    if llm.tokenizer is None:
        raise ValueError(f"{llm.path} has no tokenizer.json; the server needs one to read and write text")
    scheduler: Scheduler | None = None
    metrics = ServerMetrics(lambda: scheduler.metrics())
    scheduler = Scheduler(llm.model, llm.defaults, max_batch=max_batch, max_model_len=max_model_len, fast=llm.fast,
                          prefix_cache=prefix_cache, on_step=metrics.on_step, on_canvas=metrics.on_canvas,
                          max_stability=MAX_STABILITY)
    limit = getattr(scheduler, "max_model_len", None) or max_model_len or llm.args.max_position_embeddings
    config = ServerConfig(model_name=model_name, max_model_len=limit, api_key=api_key)
    return create_app(llm, scheduler, config, metrics)
