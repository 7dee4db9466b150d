"""The one batch engine every face drives (see engine.py)."""

from .engine import BATCHING_MODES, Engine, attempt_seed, left_pad
from .prompt_cache import PromptCache
from .request import (CanvasEvent, ConstraintChecker, DoneEvent, DraftEvent, FailedEvent, Handle, Request,
                      RequestResult)

__all__ = ["BATCHING_MODES", "CanvasEvent", "ConstraintChecker", "DoneEvent", "DraftEvent", "Engine", "FailedEvent",
           "Handle", "PromptCache", "Request", "RequestResult", "attempt_seed", "left_pad"]
