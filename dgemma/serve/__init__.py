"""`dgemma serve`: an OpenAI-compatible HTTP server over the one batch engine (`dgemma.engine`).

    schema.py   the OpenAI request/response bodies (pydantic) and their errors
    worker.py   the engine adapter: one thread owns the Engine; jobs, text deltas, stop strings
    app.py      the FastAPI routes and SSE streaming
    runner.py   ServerThread (tests, benchmarks) and cli_serve (`dgemma serve`)

Importing this package imports neither FastAPI nor uvicorn; `create_app` and `ServerThread` do.
"""

from __future__ import annotations

from .runner import ServerThread, cli_serve, is_loopback, served_name, vllm_command
from .worker import BATCHING_MODES, DEFAULT_MAX_BATCH, DEFAULT_PROMPT_CACHE_MB, EngineWorker


def create_app(model, **options):
    """The ASGI app (see `dgemma.serve.app.create_app`)."""
    from .app import create_app as make

    return make(model, **options)


__all__ = ["BATCHING_MODES", "DEFAULT_MAX_BATCH", "DEFAULT_PROMPT_CACHE_MB", "EngineWorker", "ServerThread",
           "cli_serve", "create_app", "is_loopback", "served_name", "vllm_command"]
