"""What goes into the engine (a Request), what comes out (events and a RequestResult), and the handle between."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import SamplerSettings

ConstraintChecker = Callable[[int, np.ndarray], np.ndarray]
"""checker(row, canvas_tokens [C]) -> bool [C]: the positions whose token breaks a known constraint of that row's
task (for Sudoku: a digit repeated in its row, column or box, or a given overwritten)."""


class Checker:
    """A constraint checker as the engine calls it: `many(rows [n], canvas_tokens [n, C]) -> bool [n, C]`, once per
    pass for all live rows. Subclass it and override `many` for a vectorised check; a plain function
    `checker(row, tokens)` is wrapped by `as_checker`."""

    def __call__(self, row: int, tokens: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def many(self, rows, tokens: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(self(int(r), t), dtype=bool) for r, t in zip(rows, tokens)]).reshape(tokens.shape)


class _FunctionChecker(Checker):
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, row, tokens):
        return self.fn(row, tokens)


def as_checker(checker) -> Checker | None:
    """The checker as a `Checker` (a function, or an object with `__call__` and maybe `many`)."""
    if checker is None or isinstance(checker, Checker):
        return checker
    if callable(getattr(checker, "many", None)):
        return checker  # already speaks the engine's protocol
    return _FunctionChecker(checker)


SPEEDS = ("exact", "fast")


@dataclass(frozen=True)
class FastPolicy:
    """speed="fast": denoise only what still changes. A canvas position whose argmax has stayed the same with
    entropy under `freeze_entropy` for `freeze_after` passes freezes: it keeps that token, its keys/values stay in
    the cache's canvas slots, and it is no longer forwarded (it is forwarded once more, on the pass after it
    froze, so its keys/values reflect the final token). Every `refresh_every`-th pass of a canvas forwards every
    position (0: never). A canvas stops only on a full pass: a partial pass that looks confident makes the next one
    full, where the stopping rule is exact's. On every full pass a frozen position whose argmax moved, or whose
    entropy rose to `freeze_entropy`, is denoised again. The commit pass is exact."""

    freeze_after: int = 2
    freeze_entropy: float = 0.05
    refresh_every: int = 8

    def __post_init__(self):
        if self.freeze_after < 1 or self.refresh_every < 0 or not self.freeze_entropy > 0:
            raise ValueError("fast policy: freeze_after >= 1, refresh_every >= 0 and freeze_entropy > 0")


@dataclass
class Request:
    """One generation. With `attempts=K` (or K `views`: different encodings of one request, such as Sudoku's
    symmetric views) K canvases are denoised side by side, each with its own noise; the first that passes the
    checker is kept, else the one it flags least."""

    prompt_ids: Sequence[int]
    settings: SamplerSettings
    seed: int | None = None                 # attempt a draws from attempt_seed(seed, a)
    noise: Any = None                       # a RowNoise (or one per row) instead of a seed; tests inject ScriptedNoise
    attempts: int = 1
    views: Sequence[Sequence[int]] | None = None
    checker: Any = None
    checker_rows: Sequence[int] | None = None  # the `row` the checker is called with, one per attempt/view
    max_retries: int = 0
    stop_when_valid: bool = False
    renoise: bool = True
    constraint: Any = None                  # a structured-output RowConstraint (dgemma.structured)
    drafts: bool = False
    on_step: Callable | None = None         # on_step(block, step, argmax [K, C], accepted [K, C]), device arrays
    input_embeds: Any = None                # [T, hidden] prompt embeddings (image features merged in)
    image_blocks: Any = None                # [T] ints: 0 text, b > 0 the tokens of image b
    cacheable: bool = True                  # may use and fill the engine's prompt cache
    speed: str = "exact"                    # "exact" (the reference's computation) or "fast" (FastPolicy)
    fast: FastPolicy | None = None          # the fast mode's knobs (default FastPolicy())

    def prompts(self) -> list[list[int]]:
        if self.views is not None:
            return [list(map(int, v)) for v in self.views]
        return [list(map(int, self.prompt_ids))] * self.attempts

    @property
    def width(self) -> int:
        """Rows (canvases) this request denoises side by side."""
        return len(self.views) if self.views is not None else self.attempts


@dataclass
class RequestResult:
    token_ids: list[int]            # up to the first eos (exclusive), no pads, at most max_new_tokens
    raw_token_ids: list[int]        # every committed canvas, pads included (as the reference returns them)
    finish_reason: str              # "eos" or "length"
    prompt_tokens: int
    cached_tokens: int              # prompt tokens whose cache came from the prompt cache
    decoder_passes: int
    steps_per_canvas: list[int]
    tokens_per_forward: float       # non-pad generated tokens / decoder passes, as the reference defines it
    retries: int
    attempts: int
    seconds: float
    chosen: bool = True             # whether this row's canvas was kept every block (with views)
    views: list["RequestResult"] = field(default_factory=list)  # with views: one result per view, in order


_ids = itertools.count()


class Handle:
    """The caller's ticket for a submitted request."""

    def __init__(self, request: Request):
        self.request = request
        self.id = next(_ids)
        self.result: RequestResult | None = None
        self.error: Exception | None = None
        self.cancelled = False
        self.cached_tokens = 0          # prompt tokens reused from the prompt cache, known once admitted

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None or self.cancelled

    def __repr__(self) -> str:
        return f"Handle({self.id}, done={self.done})"


@dataclass
class DraftEvent:
    handle: Handle
    block: int
    step: int
    tokens: np.ndarray              # argmax canvas of the request's first live row after this pass
    accepted: np.ndarray


@dataclass
class CanvasEvent:
    handle: Handle
    block: int
    tokens: np.ndarray              # the committed canvas; after an eos the rest is pad
    steps: int
    retries: int
    finished: bool
    hit_eos: bool


@dataclass
class DoneEvent:
    handle: Handle
    result: RequestResult


@dataclass
class FailedEvent:
    handle: Handle
    error: Exception
