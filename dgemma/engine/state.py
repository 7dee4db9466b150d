"""What the engine keeps per row (one canvas being denoised) and per request (its rows, its blocks) between passes.

Nothing vocabulary-sized lives here: a row keeps its canvas [C], its argmax canvas [C] and the self-conditioning input
in hidden space [C, hidden] (softmax(processed logits) @ embedding * sqrt(hidden)), as vLLM keeps it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .request import Handle, Request


@dataclass(eq=False)
class Row:
    job: "Job"
    index: int                      # attempt / view number within the request
    noise: Any                      # its RowNoise
    checker_row: int
    # the canvas being denoised
    canvas: Any = None              # device [C]
    argmax: Any = None              # device [C]: what is committed when the canvas stops
    soft: Any = None                # device [C, H] or None (first pass of a denoising round)
    step: int = 0                   # passes in this denoising round (a retry starts a new round)
    base: int = 0                   # noise step key of this round's start (retries draw under keys of their own)
    stable: int = 0                 # consecutive passes whose argmax equalled the previous one
    live: bool = False              # denoised by the next pass
    passed: bool = False            # its canvas passed the checker (groups / stop_when_valid)
    mask_at: int = -1               # structured output: the position whose logits are masked on the next pass
    mask: Any = None                # host bool [V]: the tokens allowed there
    # what it produced
    steps: int = 0                  # passes spent on the current canvas (retries included)
    passes: int = 0                 # decoder passes over the whole generation
    raw: list = field(default_factory=list)
    steps_per_canvas: list = field(default_factory=list)
    chosen: list = field(default_factory=list)
    retired: bool = False           # a view that ended because its request went on with another view
    candidates: Any = None          # structured output: device [C, K] top tokens of the last pass (for the repair)
    fast: Any = None                # the FastPolicy when this row denoises in fast mode
    frozen: Any = None              # fast mode, host bool [C]: positions no longer forwarded
    just_froze: Any = None          # host bool [C]: froze on the last pass (forwarded once more)
    frozen_tokens: Any = None       # host int [C]: the token each frozen position keeps
    settle: Any = None              # host int [C]: passes each position's argmax has stayed the same and confident
    pos_entropy: Any = None         # host float [C]: each position's entropy when it was last forwarded
    prev_argmax: Any = None         # host int [C]: the last pass's argmax canvas
    check_next: bool = False        # fast mode: the next pass forwards every position (a partial one looked confident)


@dataclass(eq=False)
class Job:
    """A request inside the engine."""

    handle: Handle
    prompts: list                   # one token list per row
    rows: list = field(default_factory=list)
    block: int = 0
    retry_round: int = 0
    retries: int = 0
    retries_this_block: int = 0
    cached_tokens: int = 0
    checker: Any = None             # the request's checker, as a dgemma.engine.Checker
    started: float = field(default_factory=time.perf_counter)
    finished: bool = False

    @property
    def request(self) -> Request:
        return self.handle.request

    @property
    def settings(self):
        return self.handle.request.settings

    def active_rows(self) -> list[Row]:
        return [r for r in self.rows if not r.retired]

    def canvas_over(self) -> bool:
        """No row of the request is still denoising this canvas."""
        return not any(r.live for r in self.rows)


def visible_tokens(raw, eos_ids, pad_id) -> list[int]:
    """Generated tokens up to the first eos (exclusive), without pads."""
    eos = set(eos_ids)
    out = []
    for t in raw:
        if t in eos:
            break
        if pad_id is not None and t == pad_id:
            continue
        out.append(int(t))
    return out


def pad_after_eos(tokens: np.ndarray, eos_ids, pad_id) -> tuple[np.ndarray, bool]:
    """The canvas as committed: after its first eos every token is pad (the reference's rule)."""
    eos = np.asarray(eos_ids, dtype=np.int64)
    hits = np.flatnonzero(np.isin(tokens, eos)) if eos.size else np.zeros(0, np.int64)
    if hits.size and pad_id is not None:
        tokens = tokens.copy()
        tokens[int(hits[0]) + 1:] = pad_id
    return tokens, bool(hits.size)
