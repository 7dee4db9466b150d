"""The one batch engine every face drives (see engine.py)."""

from .engine import BATCHING_MODES, Engine, attempt_seed, left_pad
from .prompt_cache import PromptCache
from .request import (SPEEDS, CanvasEvent, Checker, ConstraintChecker, DoneEvent, DraftEvent, FailedEvent,
                      FastPolicy, Handle, Request,
                      RequestResult, as_checker)

__all__ = ["BATCHING_MODES", "CanvasEvent", "Checker", "ConstraintChecker", "DoneEvent", "DraftEvent", "Engine", "FailedEvent", "FastPolicy", "SPEEDS",
           "Handle", "PromptCache", "Request", "RequestResult", "as_checker", "attempt_seed", "left_pad"]
