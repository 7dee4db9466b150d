"""Moved to the package `dgemma.serve` (schema, worker, app, runner); this module re-exports what older imports used
(`from dgemma.server import ServerThread, create_app`)."""

from __future__ import annotations

from .serve import (BATCHING_MODES, DEFAULT_MAX_BATCH, ServerThread, cli_serve, create_app, is_loopback,  # noqa: F401
                    served_name, vllm_command)
