"""The engine adapter: one thread owns the `dgemma.engine.Engine`; HTTP handlers talk to it through a queue.

The engine is not thread-safe, so every call into it (submit, cancel, step) happens on the worker thread. A handler
turns each choice of its request into a `Job`, hands the jobs to `EngineWorker.submit` and reads events back from
its own asyncio queue: ("accepted",) once the engine took the job, then ("chunk", text_delta), ("draft", payload),
("done", Result) or ("error", status, message). Cancelling (a client that went away) is a command like any other; the
engine drops the job's rows at its next step.

Text is the server's business (the engine works in tokens): `TextStream` decodes the committed canvases, cuts at a
stop string, and streams only text that can no longer change (a possible stop-string prefix and an unfinished UTF-8
character are held back until the next canvas).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import SamplerSettings
from ..errors import DgemmaError
from .schema import ApiError

DEFAULT_MAX_BATCH = 16
BATCHING_MODES = ("merged", "exact")   # merged: one decoder pass for all rows; exact: one per request
DEFAULT_PROMPT_CACHE_MB = 512
MAX_WAITING = 1024                     # jobs queued in the engine before new requests get a 503


# ======================================================================================================================
# Text: canvases -> deltas, stop strings, finish reasons
# ======================================================================================================================
@dataclass
class Result:
    """One choice, finished."""

    text: str
    token_ids: list[int]
    finish_reason: str          # "stop" (eos or a stop string) or "length"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    tokens_per_forward: float
    decoder_passes: int
    canvases: int
    steps_per_canvas: list[int]
    seconds: float


def visible_tokens(raw: Sequence[int], settings: SamplerSettings) -> list[int]:
    """Generated tokens up to the first eos (exclusive), without pads: what a client sees."""
    eos = set(settings.eos_token_ids)
    out = []
    for t in raw:
        if t in eos:
            break
        if settings.pad_token_id is None or t != settings.pad_token_id:
            out.append(int(t))
    return out


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


class TextStream:
    """The text of one choice as its canvases commit."""

    def __init__(self, tokenizer, settings: SamplerSettings, stops: Sequence[str] = ()):
        self.tokenizer, self.settings, self.stops = tokenizer, settings, tuple(stops)
        self.raw: list[int] = []
        self.visible: list[int] = []
        self.text = ""           # everything decoded so far (cut at a stop string)
        self.emitted = ""        # the prefix of `text` already sent
        self.stopped = False     # a stop string was found
        self.completion_tokens = 0

    def add_canvas(self, tokens: Sequence[int], finished: bool) -> str:
        """The text delta that can be sent after this committed canvas."""
        self.raw.extend(int(t) for t in tokens)
        self.visible = visible_tokens(self.raw, self.settings)[: self.settings.max_new_tokens]
        self.text = self._decode(self.visible)
        self.completion_tokens = len(self.visible)
        cut = find_stop(self.text, self.stops)
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            self.completion_tokens = self._tokens_until_stop()
        if finished or self.stopped:
            return self._advance(self.text, final=True)
        hold = max((len(s) for s in self.stops), default=1) - 1
        return self._advance(self.text[: len(self.text) - hold].rstrip("\ufffd"), final=False)

    def finish(self, token_ids: Sequence[int]) -> str:
        """The last delta once the engine says the choice is done (its visible tokens are authoritative)."""
        if not self.stopped:
            self.visible = list(token_ids)
            self.text = self._decode(self.visible)
            self.completion_tokens = len(self.visible)
        return self._advance(self.text, final=True)

    def _advance(self, shown: str, final: bool) -> str:
        if shown.startswith(self.emitted) and len(shown) > len(self.emitted):
            delta, self.emitted = shown[len(self.emitted):], shown
            return delta
        if final and not shown.startswith(self.emitted):  # the prefix decoded differently (rare): send the rest
            delta, self.emitted = shown[len(self.emitted):], shown
            return delta
        return ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _tokens_until_stop(self) -> int:
        """The fewest leading tokens whose text holds a stop string (binary search: containment grows with length)."""
        ids = self.visible
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if find_stop(self._decode(ids[:mid]), self.stops) is not None:
                hi = mid
            else:
                lo = mid + 1
        return hi


# ======================================================================================================================
# Jobs: one choice of a request on its way through the engine
# ======================================================================================================================
@dataclass
class Job:
    request: Any                               # the engine's Request
    stream: TextStream
    deliver: Callable[[tuple], None]           # thread-safe: puts an event on the HTTP handler's queue
    drafts: bool = False
    prepare: Callable[[Any], None] | None = None  # fills in the request on the worker thread (image prompts)
    handle: Any = None
    cancelled: bool = False
    finished: bool = False
    canvases: int = 0
    passes: int = 0
    cached_tokens: int = 0
    steps: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def send(self, event: tuple) -> None:
        if self.cancelled:
            return
        try:
            self.deliver(event)
        except Exception:  # a closed event loop (the client went away) must not stop the engine
            pass


class EngineWorker:
    """The thread that owns the engine. `submit`/`cancel` may be called from any thread."""

    def __init__(self, model, *, max_batch: int = DEFAULT_MAX_BATCH, batching: str = "merged",
                 prompt_cache_mb: float = DEFAULT_PROMPT_CACHE_MB):
        from ..errors import InputError

        if max_batch < 1:
            raise InputError("--max-batch must be at least 1")
        if batching not in BATCHING_MODES:
            raise InputError(f"--batching must be one of {', '.join(BATCHING_MODES)}, not {batching!r}")
        if prompt_cache_mb < 0:
            raise InputError(f"--prompt-cache-mb must be >= 0 (0 turns the prompt cache off), not {prompt_cache_mb}")
        self.model = model
        self.max_batch, self.batching, self.prompt_cache_mb = max_batch, batching, prompt_cache_mb
        self.engine = self._new_engine()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[int, Job] = {}      # handle.id -> job
        self._pending = 0                    # jobs submitted but not yet handed to the engine
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "max_active_seen": 0}
        self._engine_stats: dict = self.engine.stats()

    def _new_engine(self):
        from ..engine import PromptCache

        cache = PromptCache(int(self.prompt_cache_mb * 2**20)) if self.prompt_cache_mb else None
        return self.model.engine(max_batch=self.max_batch, batching=self.batching, prompt_cache=cache)

    # -- any thread ---------------------------------------------------------------------------------------------------
    def start(self) -> "EngineWorker":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="dgemma-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        waiting = []
        while not self._inbox.empty():
            kind, jobs = self._inbox.get_nowait()
            waiting += jobs if kind == "submit" else []
        for job in list(self._live.values()) + waiting:
            job.send(("error", 503, "the server is shutting down"))
        self._live.clear()

    def submit(self, jobs: list[Job]) -> None:
        with self._lock:
            if self._stopping:
                raise ApiError(503, "the server is shutting down")
            if self._pending + len(self._live) + len(jobs) > MAX_WAITING + self.max_batch:
                raise ApiError(503, "too many requests waiting; try again later")
            self._pending += len(jobs)
        self._inbox.put(("submit", jobs))

    def cancel(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.finished and not j.cancelled]
        if jobs:
            self._inbox.put(("cancel", jobs))

    def stats(self) -> dict:
        """The server's counts (choices running / waiting / completed / cancelled / failed), the engine's own
        `stats()` under "engine" (rows held, requests inside, passes, prompt cache) and its pass counters."""
        with self._lock:
            engine = dict(self._engine_stats)
            return {"active": len(self._live), "waiting": self._pending, "max_batch": self.max_batch,
                    "batching": self.batching, "prompt_cache_mb": self.prompt_cache_mb, **self.counters,
                    **{k: engine.get(k, 0) for k in ("decoder_passes", "rows_denoised", "max_rows_seen", "prefills")},
                    "engine": engine}

    # -- the worker thread --------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            self._take_commands(block=not self.engine.busy)
            if self._stopping or not self.engine.busy:
                continue
            self.counters["max_active_seen"] = max(self.counters["max_active_seen"], len(self._live))
            try:
                events = self.engine.step()
            except Exception as e:  # a failed pass fails the requests in it; the server keeps serving
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")
                continue
            for ev in events:
                self._dispatch(ev)
            self._snapshot()

    def _take_commands(self, block: bool) -> None:
        try:
            cmd = self._inbox.get(timeout=0.25) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, jobs = cmd
            if kind == "submit":
                self._submit(jobs)
            elif kind == "cancel":
                self._cancel(jobs)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            with self._lock:
                self._pending -= 1
            if job.cancelled:
                continue
            try:
                if job.prepare is not None:
                    job.prepare(job.request)
                job.handle = self.engine.submit(job.request)
            except Exception as e:
                self.counters["failed"] += 1
                job.finished = True
                job.send(("error", 400 if isinstance(e, DgemmaError) else 500, str(e)))
                continue
            with self._lock:
                self._live[job.handle.id] = job
            job.send(("accepted",))

    def _cancel(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.finished or job.cancelled:
                continue
            job.cancelled = True
            self.counters["cancelled"] += 1
            if job.handle is not None and job.handle.id in self._live:
                self.engine.cancel(job.handle)
                with self._lock:
                    del self._live[job.handle.id]

    def _dispatch(self, ev) -> None:
        from ..engine import CanvasEvent, DoneEvent, DraftEvent, FailedEvent

        job = self._live.get(ev.handle.id)
        if job is None:  # cancelled or stopped at a stop string: no more events for it
            return
        if isinstance(ev, DraftEvent):
            job.send(("draft", self._draft(job, ev)))
        elif isinstance(ev, CanvasEvent):
            self._on_canvas(job, ev)
        elif isinstance(ev, DoneEvent):
            job.send(("chunk", job.stream.finish(ev.result.token_ids)))
            self._finish(job, self._result(job, ev.result))
        elif isinstance(ev, FailedEvent):
            self.counters["failed"] += 1
            job.send(("error", 400 if isinstance(ev.error, DgemmaError) else 500, str(ev.error)))
            self._forget(job)

    def _on_canvas(self, job: Job, ev) -> None:
        if job.canvases == 0:  # the prompt cache's reuse is known once the request has been admitted
            job.cached_tokens = job.handle.cached_tokens
        job.canvases += 1
        job.steps.append(int(ev.steps))
        job.passes += int(ev.steps)
        delta = job.stream.add_canvas(np.asarray(ev.tokens).reshape(-1).tolist(), bool(ev.finished))
        if delta:
            job.send(("chunk", delta))
        if job.stream.stopped and not ev.finished:  # a stop string: the rest is not needed
            self.engine.cancel(job.handle)
            self._finish(job, self._stopped_result(job))

    def _draft(self, job: Job, ev) -> dict:
        toks = np.asarray(ev.tokens).reshape(-1).tolist()
        tok = self.model.tokenizer
        return {"block": int(ev.block), "step": int(ev.step),
                "max_steps": job.request.settings.max_denoising_steps, "token_ids": toks,
                "accepted": [bool(x) for x in np.asarray(ev.accepted).reshape(-1)],
                "pieces": [tok.decode([t]) for t in toks] if tok is not None else []}

    def _result(self, job: Job, r) -> Result:
        s = job.stream
        reason = "stop" if s.stopped or r.finish_reason == "eos" else "length"
        return Result(text=s.text, token_ids=list(s.visible), finish_reason=reason, prompt_tokens=r.prompt_tokens,
                      cached_tokens=r.cached_tokens, completion_tokens=s.completion_tokens,
                      tokens_per_forward=r.tokens_per_forward, decoder_passes=r.decoder_passes,
                      canvases=len(r.steps_per_canvas), steps_per_canvas=list(r.steps_per_canvas),
                      seconds=r.seconds)

    def _stopped_result(self, job: Job) -> Result:
        """A choice cut at a stop string before the engine finished it: counted from the canvases it committed."""
        s = job.stream
        pad = s.settings.pad_token_id
        non_pad = sum(1 for t in s.raw if t != pad) if pad is not None else len(s.raw)
        return Result(text=s.text, token_ids=list(s.visible), finish_reason="stop",
                      prompt_tokens=len(job.request.prompt_ids), cached_tokens=job.cached_tokens,
                      completion_tokens=s.completion_tokens,
                      tokens_per_forward=non_pad / job.passes if job.passes else 0.0, decoder_passes=job.passes,
                      canvases=job.canvases, steps_per_canvas=list(job.steps),
                      seconds=time.perf_counter() - job.started)

    def _finish(self, job: Job, result: Result) -> None:
        self.counters["completed"] += 1
        job.send(("done", result))
        self._forget(job)

    def _forget(self, job: Job) -> None:
        job.finished = True
        with self._lock:
            self._live.pop(job.handle.id, None)

    def _fail_all(self, message: str) -> None:
        """After an exception inside a step the engine's state is unknown: fail its jobs and start a fresh one."""
        for job in list(self._live.values()):
            self.counters["failed"] += 1
            job.send(("error", 500, message))
            self._forget(job)
        self.engine = self._new_engine()
        self._snapshot()

    def _snapshot(self) -> None:
        stats = self.engine.stats()
        with self._lock:
            self._engine_stats = stats
