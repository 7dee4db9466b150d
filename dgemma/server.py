"""`dgemma serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) with continuous batching.

Engine. One thread owns the model. Each request keeps its own state: its KV cache from `backend.prefill` of its prompt
alone, its own noise source (`backend.row_noise(seed)`), its canvas, self-conditioning probabilities and stopping
history. Every engine iteration gathers the canvases of all active requests and runs ONE batched decoder pass over
them, then the shared sampler (`dgemma.sampler.denoise_step`, `StableAndConfident`) decides each row on its own. A
request whose canvas stops is committed through the encoder (alone, on its own state) and starts its next canvas at
the next iteration; a finished request leaves, and waiting requests join (their prefill runs between two decoder
passes, at most about one pass worth of prompt tokens per iteration while others are running).

Exactness. A request's random draws come from its own generator in the same order as `run_blocks` makes them, and
its own state, so the only thing batching changes is float rounding. Two modes (`--batching`):
- merged (default): the per-backend batcher below left-pads the per-request caches into one state (pads marked
  invalid, as a left-padded prefill would) and gives the decoder per-row RoPE tables, so each row's canvas sits at the
  positions it has alone. Its logits equal the solo ones up to rounding (~1e-5 in float32: the MoE experts' small
  matmuls and the padded attention round differently in a batch). A trained model's decisions mostly have margins far
  above that, but near-ties flip, and on the random test checkpoint (whose self-conditioning amplifies a difference
  ~8x per step) the answers diverge after a few steps -- exactly as `Model.generate_batch` does there.
- exact: one decoder pass per request per iteration, inside the same continuous-batching loop (the scheduling, joins,
  leaves and streaming are the same; only the forward is not batched). Bit-identical to `Model.generate` alone.

HTTP. `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (streaming by SSE or not), `GET /health`.
Body fields: model, messages / prompt, max_tokens (or max_completion_tokens), temperature, seed, stop, n, stream,
stream_options.include_usage, and the dgemma extras max_denoising_steps, entropy_bound, confidence_threshold,
stability_threshold, t_min, t_max, ignore_eos, dgemma_drafts (stream the draft canvas of every denoising step as SSE
events `event: dgemma.draft`). Temperature maps onto the schedule: t_max becomes `temperature` and t_min scales by the
same ratio (the default 0.8 -> 0.4 schedule becomes T -> T/2); temperature 0 is taken as 0.01 (near-greedy: the
sampler has no exact greedy mode); explicit t_min / t_max in the body win. usage carries tokens_per_forward,
decoder_passes and canvases besides the OpenAI counts.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import shlex
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .api import Model, _visible
from .config import SamplerSettings
from .errors import DgemmaError, InputError
from .sampler import StableAndConfident, denoise_step
from .scheduler import check_prompts, left_pad

DEFAULT_MAX_BATCH = 16
# merged: one decoder pass over all active requests (fast; equal to a solo run up to float rounding).
# exact: one decoder pass per request inside the same loop (bit-identical to a solo run; no batched matmuls).
BATCHING_MODES = ("merged", "exact")
MAX_WAITING = 1024
MAX_N = 16
MIN_TEMPERATURE = 0.01
_SEED_MOD = 2**63


# ======================================================================================================================
# Batched decoder passes over per-request states (one small adapter per backend)
# ======================================================================================================================
class RowBatcher:
    """One decoder pass per request: correct on every backend, batches nothing (the fallback)."""

    merges = False

    def __init__(self, backend):
        self.backend = backend

    def denoise(self, states: list, lengths: list[int], canvas, probs):
        be = self.backend
        if len(states) == 1:
            return be.denoise(states[0], canvas, self_conditioning_probs=probs)
        rows = [be.denoise(s, canvas[r:r + 1], self_conditioning_probs=None if probs is None else probs[r:r + 1])[0]
                for r, s in enumerate(states)]
        return be.ops.stack_rows(rows)

    def reset(self) -> None:
        pass


class _MergingBatcher(RowBatcher):
    """Left-pads single-row KV states (KVState: keys/values per layer [1, H, L, D], valid [1, length], length) into one
    batch state and runs the backend's own decoder over it with per-row RoPE positions. The merged state is cached
    while the batch's requests and their cache lengths stay the same."""

    merges = True

    def __init__(self, backend):
        super().__init__(backend)
        self._cache: tuple | None = None
        self._tls = threading.local()
        self._install_rope_hook()

    def reset(self) -> None:
        self._cache = None

    def denoise(self, states, lengths, canvas, probs):
        if len(states) == 1:
            return self.backend.denoise(states[0], canvas, self_conditioning_probs=probs)
        c = self._cache
        if c is None or len(c[0]) != len(states) or any(a is not b for a, b in zip(c[0], states)) or c[1] != lengths:
            self._cache = c = (list(states), list(lengths), self._merge(states, lengths), {})
        merged, tables = c[2], c[3]
        self._tls.override = (lengths, tables)
        try:
            return self.backend.denoise(merged, canvas, self_conditioning_probs=probs)
        finally:
            self._tls.override = None

    # per backend
    def _merge(self, states, lengths):
        raise NotImplementedError

    def _install_rope_hook(self):
        raise NotImplementedError


class TorchBatcher(_MergingBatcher):
    def _merge(self, states, lengths):
        import torch

        with torch.inference_mode():
            B, L = len(states), max(lengths)
            keys, values = [], []
            for i in range(len(states[0].keys)):
                n = max(s.keys[i].shape[2] for s in states)
                for attr, out in (("keys", keys), ("values", values)):
                    first = getattr(states[0], attr)[i]
                    t = first.new_zeros((B, first.shape[1], n, first.shape[3]))
                    for r, s in enumerate(states):
                        x = getattr(s, attr)[i]
                        t[r, :, n - x.shape[2]:] = x[0]
                    out.append(t)
            valid = torch.zeros((B, L), dtype=torch.bool, device=states[0].valid.device)
            for r, s in enumerate(states):
                valid[r, L - s.length:] = s.valid[0]
            has_padding = not bool(valid.all())
        return type(states[0])(keys=keys, values=values, valid=valid, length=L, has_padding=has_padding)

    def _install_rope_hook(self):
        import torch

        model = self.backend.model
        original = type(model).rope
        tls = self._tls

        def rope(positions, dtype):
            ov = getattr(tls, "override", None)
            if ov is None:
                return original(model, positions, dtype)
            lengths, tables = ov
            n = int(positions.shape[0])
            if int(positions[0]) != max(lengths):
                raise RuntimeError("dgemma.server: the decoder asked for RoPE positions the batcher did not expect")
            key = (n, dtype)
            if key not in tables:
                per_row = [original(model, torch.arange(L, L + n, device=positions.device), dtype) for L in lengths]
                tables[key] = {k: (torch.cat([t[k][0] for t in per_row]), torch.cat([t[k][1] for t in per_row]))
                               for k in per_row[0]}
            return tables[key]

        model.rope = rope  # an instance attribute: other threads (no override set) get the original tables


class MLXBatcher(_MergingBatcher):
    def _merge(self, states, lengths):
        import mlx.core as mx

        B, L = len(states), max(lengths)
        keys, values = [], []
        for i in range(len(states[0].keys)):
            n = max(s.keys[i].shape[2] for s in states)
            for attr, out in (("keys", keys), ("values", values)):
                rows = []
                for s in states:
                    x = getattr(s, attr)[i]
                    pad = n - x.shape[2]
                    rows.append(mx.pad(x, [(0, 0), (0, 0), (pad, 0), (0, 0)]) if pad else x)
                out.append(mx.concatenate(rows, axis=0))
        valid = np.zeros((B, L), dtype=bool)
        for r, s in enumerate(states):
            valid[r, L - s.length:] = np.asarray(s.valid)[0]
        return type(states[0])(keys=keys, values=values, valid=valid, length=L, has_padding=not bool(valid.all()))

    def _install_rope_hook(self):
        import mlx.core as mx

        model = self.backend.model
        original = type(model).rope
        tls = self._tls

        def rope(start, n, dtype):
            ov = getattr(tls, "override", None)
            if ov is None:
                return original(model, start, n, dtype)
            lengths, tables = ov
            if int(start) != max(lengths):
                raise RuntimeError("dgemma.server: the decoder asked for RoPE positions the batcher did not expect")
            key = (n, dtype)
            if key not in tables:
                per_row = [original(model, L, n, dtype) for L in lengths]
                # [B, 1, C, D]: broadcasts over the heads of q/k [B, H, C, D]
                tables[key] = {k: (mx.stack([t[k][0] for t in per_row])[:, None],
                                   mx.stack([t[k][1] for t in per_row])[:, None]) for k in per_row[0]}
            return tables[key]

        object.__setattr__(model, "rope", rope)


def batcher_for(backend) -> RowBatcher:
    """The batcher that fits the backend: merged states for the two built-in backends, one pass per row otherwise."""
    model = getattr(backend, "model", None)
    try:
        if backend.name == "cuda" and model is not None and hasattr(model, "rope"):
            return TorchBatcher(backend)
        if backend.name == "mlx" and model is not None and hasattr(model, "rope"):
            return MLXBatcher(backend)
    except Exception:  # pragma: no cover - an unexpected model layout: stay correct, just unbatched
        pass
    return RowBatcher(backend)


# ======================================================================================================================
# The engine: continuous batching over canvases
# ======================================================================================================================
@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str          # "stop" (eos or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    tokens_per_forward: float
    decoder_passes: int
    canvases: int
    steps_per_canvas: list[int]
    seconds: float


@dataclass
class GenRequest:
    """One generation (one choice of an HTTP request). `sink(event)` is called from the engine thread with
    ("chunk", text, token_ids), ("draft", payload), ("done", Result) or ("error", status, message)."""

    prompt_ids: list[int]
    settings: SamplerSettings
    seed: int
    sink: Callable[[tuple], None]
    stop: tuple[str, ...] = ()
    drafts: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    cancelled: bool = False
    finished: bool = False
    # engine-side state
    state: Any = None
    noise: Any = None
    block: int = 0
    it: int = 0
    canvas: Any = None
    argmax: Any = None
    probs: Any = None
    stopper: Any = None
    fresh: bool = True
    passes: int = 0
    steps: list = field(default_factory=list)
    raw: list = field(default_factory=list)
    length: int = 0
    emitted: str = ""
    sent_tokens: int = 0
    started: float = 0.0


class Engine:
    """Owns the model on one thread; requests join and leave at canvas boundaries."""

    def __init__(self, model: Model, max_batch: int = DEFAULT_MAX_BATCH, batching: str = "merged"):
        if max_batch < 1:
            raise InputError("--max-batch must be at least 1")
        if batching not in BATCHING_MODES:
            raise InputError(f"batching must be one of {', '.join(BATCHING_MODES)}, not {batching!r}")
        self.model = model
        self.backend = model.backend
        self.ops = model.backend.ops
        self.cfg = model.config
        self.max_batch = max_batch
        self.batching = batching
        self.batcher = batcher_for(model.backend) if batching == "merged" else RowBatcher(model.backend)
        self._cv = threading.Condition()
        self._waiting: deque[GenRequest] = deque()
        self._active: list[GenRequest] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._prev: tuple | None = None  # (rows, canvas [B, C], probs [B, C, V]) of the last pass, for reuse
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "decoder_passes": 0, "rows_denoised": 0,
                         "max_batch_seen": 0, "prefills": 0}

    # -- control ------------------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="dgemma-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._cv:
            for r in list(self._waiting) + self._active:
                self._emit(r, ("error", 503, "the server is shutting down"))
            self._waiting.clear()
            self._active.clear()

    def submit(self, req: GenRequest) -> None:
        with self._cv:
            if self._stopping:
                raise _ApiError(503, "the server is shutting down", "server_error")
            if len(self._waiting) >= MAX_WAITING:
                raise _ApiError(503, "too many requests waiting; try again later", "server_error")
            self._waiting.append(req)
            self._cv.notify_all()

    def cancel(self, req: GenRequest) -> None:
        with self._cv:
            req.cancelled = True
            self._cv.notify_all()

    def stats(self) -> dict:
        with self._cv:
            return {"active": len(self._active), "waiting": len(self._waiting), "max_batch": self.max_batch,
                    "batching": self.batching, "merged_passes": self.batcher.merges,
                    **self.counters}

    # -- the loop -----------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._stopping:
                    return
                self._drop_cancelled()
                if not self._active and not self._waiting:
                    self._cv.wait(timeout=0.25)
                    continue
                newcomers = self._take_newcomers()
            for r in newcomers:
                self._admit(r)
            if self._active:
                try:
                    self._step()
                except Exception as e:  # a failed pass fails the requests in it; the server keeps serving
                    self._fail_active(f"generation failed: {type(e).__name__}: {e}")

    def _drop_cancelled(self) -> None:
        gone = [r for r in self._active if r.cancelled]
        if gone:
            self._active = [r for r in self._active if not r.cancelled]
            for r in gone:
                self._release(r)
            self.counters["cancelled"] += len(gone)
        if any(r.cancelled for r in self._waiting):
            n = len(self._waiting)
            self._waiting = deque(r for r in self._waiting if not r.cancelled)
            self.counters["cancelled"] += n - len(self._waiting)

    def _take_newcomers(self) -> list[GenRequest]:
        """Waiting requests that join now: as many as fit when idle; while others run, about one decoder pass worth of
        prompt tokens (canvas_length per running row), and always at least one, so a newcomer's prefill stalls the
        running requests by about one step."""
        free = self.max_batch - len(self._active)
        budget = math.inf if not self._active else self.cfg.canvas_length * len(self._active)
        out, used = [], 0
        while self._waiting and len(out) < free:
            r = self._waiting[0]
            if out and used + len(r.prompt_ids) > budget:
                break
            out.append(self._waiting.popleft())
            used += len(r.prompt_ids)
        return out

    def _admit(self, r: GenRequest) -> None:
        if r.cancelled:
            self.counters["cancelled"] += 1
            return
        try:
            s = r.settings
            pad = s.pad_token_id if s.pad_token_id is not None else 0
            ids, mask = left_pad([r.prompt_ids], pad)
            r.started = time.perf_counter()
            r.state = self.backend.prefill(ids, mask)
            r.noise = self.backend.row_noise(r.seed)
            r.length = len(r.prompt_ids)
            r.block = 0
            self.counters["prefills"] += 1
            self._start_canvas(r)
        except Exception as e:
            self.counters["failed"] += 1
            status = 400 if isinstance(e, DgemmaError) else 500
            self._emit(r, ("error", status, f"prefill failed: {e}"))
            self._release(r)
            return
        with self._cv:
            self._active.append(r)

    def _start_canvas(self, r: GenRequest) -> None:
        C, V = self.cfg.canvas_length, self.cfg.vocab_size
        r.canvas = r.noise.tokens(r.block, 0, C, V)
        r.argmax = r.canvas
        r.probs = None
        r.it = 0
        r.fresh = True
        r.stopper = StableAndConfident(self.ops, r.settings.stability_threshold, r.settings.confidence_threshold)

    def _step(self) -> None:
        ops = self.ops
        C, V = self.cfg.canvas_length, self.cfg.vocab_size
        rows = list(self._active)
        B = len(rows)
        prev = self._prev
        if prev is not None and len(prev[0]) == B and all(a is b for a, b in zip(prev[0], rows)) \
                and not any(r.fresh for r in rows):
            canvas, probs = prev[1], prev[2]  # the same batch as last pass: reuse its arrays, no restacking
        else:
            canvas = ops.stack_rows([r.canvas for r in rows])
            have = [r.probs for r in rows if r.probs is not None]
            if not have:
                probs = None
            else:  # a row at its first step gets zeros: exactly the "no self-conditioning" signal (MLP of zero = 0)
                zeros = ops.full((C, V), 0.0, like=have[0])
                probs = ops.stack_rows([r.probs if r.probs is not None else zeros for r in rows])
        logits = self.batcher.denoise([r.state for r in rows], [r.length for r in rows], canvas, probs)
        self.counters["decoder_passes"] += 1
        self.counters["rows_denoised"] += B
        self.counters["max_batch_seen"] = max(self.counters["max_batch_seen"], B)

        # Each row's draws, in the order run_blocks makes them (uniforms, then re-noise tokens).
        its = [r.it + 1 for r in rows]
        uniforms = ops.stack_rows([r.noise.uniforms(r.block, it, C) for r, it in zip(rows, its)])
        renoise = ops.stack_rows([r.noise.tokens(r.block, it, C, V) for r, it in zip(rows, its)])

        # The sampler over runs of consecutive rows that share the schedule position and settings.
        def key(j):
            s = rows[j].settings
            N = s.max_denoising_steps
            return (N - its[j] + 1, N, s.t_min, s.t_max, s.entropy_bound)

        runs, a = [], 0
        for j in range(1, B + 1):
            if j == B or key(j) != key(a):
                runs.append((a, j))
                a = j
        stops, drafts = [], []
        whole = len(runs) == 1
        for a, b in runs:
            k = key(a)
            sl = (lambda x: x) if whole else (lambda x, a=a, b=b: x[a:b])
            res = denoise_step(ops, sl(logits), sl(canvas), steps_remaining=k[0], max_steps=k[1], t_min=k[2],
                               t_max=k[3], entropy_bound=k[4], uniforms=sl(uniforms), renoise_tokens=sl(renoise))
            for j in range(b - a):
                r = rows[a + j]
                r.canvas, r.argmax, r.probs = res.canvas[j], res.argmax[j], res.probs[j]
                r.it = its[a + j]
                r.passes += 1
                r.fresh = False
                stops.append(r.stopper(res.argmax[j:j + 1], res.mean_entropy[j:j + 1]))
                if r.drafts:
                    drafts.append((r, res.argmax[j], res.accepted[j]))
            if whole:
                self._prev = (rows, res.canvas, res.probs)
        if not whole:
            self._prev = None
        stop = np.asarray(ops.to_numpy(ops.stack_rows(stops))).reshape(B).astype(bool)
        for r, am, acc in drafts:
            self._emit_draft(r, am, acc)
        finished_canvas = [r for j, r in enumerate(rows) if stop[j] or r.it >= r.settings.max_denoising_steps]
        for r in finished_canvas:
            if not r.cancelled:
                self._finish_canvas(r)

    def _emit_draft(self, r: GenRequest, argmax, accepted) -> None:
        toks = [int(t) for t in np.asarray(self.ops.to_numpy(argmax)).reshape(-1)]
        acc = [bool(x) for x in np.asarray(self.ops.to_numpy(accepted)).reshape(-1)]
        tok = self.model.tokenizer
        pieces = [tok.decode([t]) for t in toks] if tok is not None else []
        self._emit(r, ("draft", {"block": r.block, "step": r.it, "max_steps": r.settings.max_denoising_steps,
                                 "token_ids": toks, "accepted": acc, "pieces": pieces}))

    def _finish_canvas(self, r: GenRequest) -> None:
        s = r.settings
        C = self.cfg.canvas_length
        tokens = np.array(self.ops.to_numpy(r.argmax), dtype=np.int64, copy=True).reshape(-1)
        eos = np.asarray(s.eos_token_ids, dtype=np.int64)
        hit_eos = bool(eos.size and np.isin(tokens, eos).any())
        if hit_eos and s.pad_token_id is not None:
            first = int(np.flatnonzero(np.isin(tokens, eos))[0])
            tokens[first + 1:] = s.pad_token_id
        r.raw.extend(int(t) for t in tokens)
        r.steps.append(r.it)
        done = hit_eos or (r.block + 1) * C >= s.max_new_tokens
        visible_all = _visible(r.raw, s)
        visible = visible_all[: s.max_new_tokens]
        tok = self.model.tokenizer
        full = tok.decode(visible) if tok is not None else ""
        reason = "stop" if hit_eos and len(visible_all) <= s.max_new_tokens else "length"
        completion_tokens = len(visible)
        cut = _find_stop(full, r.stop)
        if cut is not None:
            full, done, reason = full[:cut], True, "stop"
            completion_tokens = _tokens_until_stop(tok, visible, r.stop)
        # Stream what can no longer change: hold back a possible stop-string prefix and an unfinished UTF-8 char.
        if done:
            shown = full
        else:
            hold = max((len(x) for x in r.stop), default=1) - 1
            shown = full[: len(full) - hold].rstrip("\ufffd")
        if shown.startswith(r.emitted) and len(shown) > len(r.emitted):
            delta, r.emitted = shown[len(r.emitted):], shown
        elif done and not shown.startswith(r.emitted):  # decoding of the prefix changed (rare): send the rest
            delta, r.emitted = full[len(r.emitted):], full
        else:
            delta = ""
        self._emit(r, ("chunk", delta, visible[r.sent_tokens:]))
        r.sent_tokens = len(visible)
        if done:
            pad = s.pad_token_id
            non_pad = sum(1 for t in r.raw if t != pad) if pad is not None else len(r.raw)
            result = Result(text=full, token_ids=visible, finish_reason=reason, prompt_tokens=len(r.prompt_ids),
                            completion_tokens=completion_tokens,
                            tokens_per_forward=non_pad / r.passes if r.passes else 0.0, decoder_passes=r.passes,
                            canvases=len(r.steps), steps_per_canvas=list(r.steps),
                            seconds=time.perf_counter() - r.started)
            r.finished = True
            with self._cv:
                if r in self._active:
                    self._active.remove(r)
            self._release(r)
            self.counters["completed"] += 1
            self._emit(r, ("done", result))
        else:
            self.backend.commit(r.state, tokens[None])
            r.length += C
            r.block += 1
            self._start_canvas(r)

    def _release(self, r: GenRequest) -> None:
        r.state = r.noise = r.canvas = r.argmax = r.probs = r.stopper = None
        self._prev = None

    def _fail_active(self, message: str) -> None:
        with self._cv:
            rows, self._active = self._active, []
        self._prev = None
        self.batcher.reset()
        for r in rows:
            self.counters["failed"] += 1
            self._emit(r, ("error", 500, message))
            self._release(r)

    @staticmethod
    def _emit(r: GenRequest, event: tuple) -> None:
        if r.cancelled and event[0] != "error":
            return
        try:
            r.sink(event)
        except Exception:  # a closed event loop or a broken client must not stop the engine
            pass


def _find_stop(text: str, stops) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _tokens_until_stop(tok, ids: list[int], stops) -> int:
    """The fewest leading tokens whose text contains a stop string (binary search; containment grows with length)."""
    if tok is None:
        return len(ids)
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if _find_stop(tok.decode(ids[:mid]), stops) is not None:
            hi = mid
        else:
            lo = mid + 1
    return hi


# ======================================================================================================================
# HTTP: OpenAI-compatible routes
# ======================================================================================================================
class _ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error_body(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}, "object": "error"}


_MISSING = object()


def _get(body: dict, name: str, kinds: tuple, *, what: str, check=None, default=None):
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if isinstance(v, bool) and bool not in kinds:
        raise _ApiError(400, f"'{name}' must be {what}, not a boolean", param=name)
    if not isinstance(v, kinds):
        raise _ApiError(400, f"'{name}' must be {what}, got {type(v).__name__}", param=name)
    if check is not None and not check(v):
        raise _ApiError(400, f"'{name}' must be {what}, got {v!r}", param=name)
    return v


_INT = (int,)
_NUM = (int, float)


def _finite(x) -> bool:
    return math.isfinite(float(x))


class _Service:
    """The routes' shared state: the model, its engine and its served name."""

    def __init__(self, model: Model, engine: Engine, name: str):
        self.model, self.engine, self.name = model, engine, name
        self.created = int(time.time())

    # -- request parsing ----------------------------------------------------------------------------------------------
    def check_model(self, body: dict) -> None:
        m = body.get("model", _MISSING)
        if m is _MISSING or m is None:
            raise _ApiError(400, "'model' is required", param="model")
        if not isinstance(m, str):
            raise _ApiError(400, f"'model' must be a string, got {type(m).__name__}", param="model")
        if m != self.name:
            raise _ApiError(404, f"The model '{m}' does not exist; this server serves '{self.name}'", param="model",
                            code="model_not_found")

    def settings(self, body: dict) -> SamplerSettings:
        d = self.model.sampler_defaults
        max_tokens = _get(body, "max_completion_tokens", _INT, what="a positive integer", check=lambda v: v >= 1)
        if max_tokens is None:
            max_tokens = _get(body, "max_tokens", _INT, what="a positive integer", check=lambda v: v >= 1)
        temperature = _get(body, "temperature", _NUM, what="a number between 0 and 2",
                           check=lambda v: _finite(v) and 0 <= v <= 2)
        over: dict[str, Any] = {"max_new_tokens": max_tokens}
        if temperature is not None:
            t = max(float(temperature), MIN_TEMPERATURE)
            over["t_max"] = t
            over["t_min"] = d.t_min * t / d.t_max
        for name in ("t_min", "t_max", "entropy_bound", "confidence_threshold"):
            v = _get(body, name, _NUM, what="a number > 0", check=lambda v: _finite(v) and v > 0)
            if v is not None:
                over[name] = float(v)
        for name, lo in (("max_denoising_steps", 1), ("stability_threshold", 0)):
            v = _get(body, name, _INT, what=f"an integer >= {lo}", check=lambda v, lo=lo: v >= lo)
            if v is not None:
                over[name] = v
        if _get(body, "ignore_eos", (bool,), what="a boolean", default=False):
            over["eos_token_ids"] = ()
        try:
            return self.model.settings(**over)
        except DgemmaError as e:
            raise _ApiError(400, str(e)) from None

    def common(self, body: dict) -> dict:
        self.check_model(body)
        stream = _get(body, "stream", (bool,), what="a boolean", default=False)
        so = _get(body, "stream_options", (dict,), what="an object", default={})
        include_usage = _get(so, "include_usage", (bool,), what="a boolean", default=False)
        n = _get(body, "n", _INT, what=f"an integer between 1 and {MAX_N}", check=lambda v: 1 <= v <= MAX_N,
                 default=1)
        seed = _get(body, "seed", _INT, what="an integer")
        stop = body.get("stop")
        if stop is None:
            stops: tuple[str, ...] = ()
        elif isinstance(stop, str):
            stops = (stop,) if stop else ()
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
            stops = tuple(s for s in stop if s)
        else:
            raise _ApiError(400, "'stop' must be a string or a list of at most 16 strings", param="stop")
        if _get(body, "logprobs", (bool, int), what="a boolean or integer"):
            raise _ApiError(400, "logprobs are not supported by dgemma serve", param="logprobs")
        if body.get("tools"):
            raise _ApiError(400, "tools are not supported by dgemma serve", param="tools")
        drafts = _get(body, "dgemma_drafts", (bool,), what="a boolean", default=False)
        if drafts and not stream:
            raise _ApiError(400, "'dgemma_drafts' needs 'stream': true", param="dgemma_drafts")
        return {"stream": stream, "include_usage": include_usage, "n": n, "seed": seed, "stops": stops,
                "drafts": drafts, "settings": self.settings(body)}

    def check_ids(self, ids: list[int], settings: SamplerSettings) -> None:
        cfg = self.model.config
        C = cfg.canvas_length
        needed = len(ids) + math.ceil(settings.max_new_tokens / C) * C
        if needed > cfg.max_position_embeddings:
            raise _ApiError(400, f"This model's maximum context length is {cfg.max_position_embeddings} tokens; the "
                                 f"prompt has {len(ids)} tokens and {settings.max_new_tokens} new tokens (whole "
                                 f"canvases of {C}) need {needed}", param="messages", code="context_length_exceeded")
        try:
            check_prompts([ids], cfg.vocab_size, cfg.max_position_embeddings, settings.max_new_tokens, C)
        except DgemmaError as e:
            raise _ApiError(400, str(e)) from None

    def chat_prompt(self, body: dict) -> list[int]:
        msgs = body.get("messages", _MISSING)
        if msgs is _MISSING or msgs is None:
            raise _ApiError(400, "'messages' is required", param="messages")
        if not isinstance(msgs, list) or not msgs:
            raise _ApiError(400, "'messages' must be a non-empty list", param="messages")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _ApiError(400, f"messages[{i}] must be an object with a string 'role'", param="messages")
            content = m.get("content")
            if content is None:
                content = ""
            elif isinstance(content, list):
                parts = []
                for p in content:
                    if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                        raise _ApiError(400, f"messages[{i}].content: only text parts are supported",
                                        param="messages")
                    parts.append(p["text"])
                content = "\n".join(parts)
            elif not isinstance(content, str):
                raise _ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                                param="messages")
            clean.append({"role": m["role"], "content": content})
        if self.model.tokenizer is None:
            raise _ApiError(400, "this model has no tokenizer: use /v1/completions with token ids")
        try:
            return self.model.tokenizer.encode_chat(clean)
        except DgemmaError as e:
            raise _ApiError(400, str(e), param="messages") from None

    def completion_prompts(self, body: dict) -> list[list[int]]:
        p = body.get("prompt", _MISSING)
        if p is _MISSING or p is None:
            raise _ApiError(400, "'prompt' is required", param="prompt")

        def is_ids(x):
            return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(p, str):
            items: list = [p]
        elif is_ids(p):
            items = [p]
        elif isinstance(p, list) and p and all(isinstance(x, str) or is_ids(x) for x in p):
            items = p
        else:
            raise _ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids, or a list of "
                                 "token-id lists", param="prompt")
        out = []
        for x in items:
            if isinstance(x, str):
                if not x:
                    raise _ApiError(400, "'prompt' is empty", param="prompt")
                if self.model.tokenizer is None:
                    raise _ApiError(400, "this model has no tokenizer: pass token ids", param="prompt")
                out.append(self.model.tokenizer.encode(x))
            else:
                out.append([int(t) for t in x])
        if len(out) > MAX_N:
            raise _ApiError(400, f"at most {MAX_N} prompts per request", param="prompt")
        return out


async def _next_event(request, queue: asyncio.Queue, state: dict, every: float = 0.5):
    """The next engine event for a request's handler, or None once its client has gone. The client is checked at
    least every `every` seconds however busy the queue is: a fast model puts an event on it every few milliseconds,
    so checking only when the queue goes quiet would never notice a client that left. `state` holds the time of the
    next check between calls."""
    while True:
        try:
            event = await asyncio.wait_for(queue.get(), timeout=every)
        except asyncio.TimeoutError:
            event = None
        now = time.monotonic()
        if now >= state.get("next_check", 0.0):
            state["next_check"] = now + every
            if await request.is_disconnected():
                return None
        if event is not None:
            return event


def _sse(obj: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(results: list[Result]) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    comp = sum(r.completion_tokens for r in results)
    passes = sum(r.decoder_passes for r in results)
    # tokens_per_forward: as GenerationStats defines it, over all choices of the request
    tpf_num = sum(r.tokens_per_forward * r.decoder_passes for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": comp, "total_tokens": prompt + comp,
            "tokens_per_forward": tpf_num / passes if passes else 0.0, "decoder_passes": passes,
            "canvases": sum(r.canvases for r in results)}


def create_app(model: Model, *, model_name: str = "dgemma", max_batch: int = DEFAULT_MAX_BATCH,
               batching: str = "merged", engine: Engine | None = None):
    """The ASGI app. The engine thread starts with the app (lifespan) and stops with it."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    engine = engine if engine is not None else Engine(model, max_batch=max_batch, batching=batching)
    svc = _Service(model, engine, model_name)

    def error(status, message, type_="invalid_request_error", param=None, code=None):
        return JSONResponse(_error_body(status, message, type_, param, code), status_code=status)

    async def read_body(request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise _ApiError(400, "the request body must be a JSON object")
        return body

    async def models(request: Request):
        cfg = model.config
        return JSONResponse({"object": "list", "data": [
            {"id": svc.name, "object": "model", "created": svc.created, "owned_by": "dgemma",
             "max_model_len": cfg.max_position_embeddings, "canvas_length": cfg.canvas_length}]})

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": svc.name, "backend": model.backend.describe(),
                             **engine.stats()})

    async def run(request: Request, chat: bool):
        body = await read_body(request)
        opts = svc.common(body)
        prompts = [svc.chat_prompt(body)] if chat else svc.completion_prompts(body)
        settings = opts["settings"]
        for ids in prompts:
            svc.check_ids(ids, settings)
        n = opts["n"]
        base_seed = opts["seed"]
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        reqs: list[GenRequest] = []
        for p_i, ids in enumerate(prompts):
            for c in range(n):
                idx = p_i * n + c
                seed = (base_seed + idx) % _SEED_MOD if base_seed is not None else secrets.randbits(63)

                def sink(ev, idx=idx):
                    loop.call_soon_threadsafe(queue.put_nowait, (idx, ev))

                reqs.append(GenRequest(list(ids), settings, seed, sink, stop=opts["stops"], drafts=opts["drafts"]))
        try:
            for r in reqs:
                engine.submit(r)
        except _ApiError:
            for r in reqs:
                engine.cancel(r)
            raise
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if opts["stream"]:
            return StreamingResponse(_stream(request, engine, reqs, queue, rid, created, chat, opts),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results: dict[int, Result] = {}
        try:
            watch: dict = {}
            while len(results) < len(reqs):
                item = await _next_event(request, queue, watch)
                if item is None:
                    return error(499, "client closed the request")
                idx, ev = item
                if ev[0] == "done":
                    results[idx] = ev[1]
                elif ev[0] == "error":
                    return error(ev[1], ev[2], "server_error" if ev[1] >= 500 else "invalid_request_error")
        finally:
            for r in reqs:
                if not r.finished:
                    engine.cancel(r)
        ordered = [results[i] for i in range(len(reqs))]
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                        "finish_reason": r.finish_reason, "logprobs": None} for i, r in enumerate(ordered)]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
                       for i, r in enumerate(ordered)]
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": svc.name, "choices": choices,
                             "usage": _usage(ordered), "system_fingerprint": None})

    async def _stream(request, engine, reqs, queue, rid, created, chat, opts):
        obj = "chat.completion.chunk" if chat else "text_completion"
        finished: dict[int, Result] = {}

        def chunk(idx, text=None, finish=None, role=False):
            if chat:
                delta: dict = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                ch = {"index": idx, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                ch = {"index": idx, "text": text or "", "finish_reason": finish, "logprobs": None}
            out = {"id": rid, "object": obj, "created": created, "model": svc.name, "choices": [ch]}
            if opts["include_usage"]:
                out["usage"] = None
            return _sse(out)

        try:
            if chat:
                for i in range(len(reqs)):
                    yield chunk(i, "", role=True)
            watch: dict = {}
            while len(finished) < len(reqs):
                item = await _next_event(request, queue, watch)
                if item is None:
                    return
                idx, ev = item
                kind = ev[0]
                if kind == "chunk":
                    if ev[1]:
                        yield chunk(idx, ev[1])
                elif kind == "draft":
                    yield _sse({"id": rid, "index": idx, **ev[1]}, event="dgemma.draft")
                elif kind == "done":
                    finished[idx] = ev[1]
                    yield chunk(idx, None if chat else "", finish=ev[1].finish_reason)
                elif kind == "error":
                    yield _sse(_error_body(ev[1], ev[2], "server_error" if ev[1] >= 500 else "invalid_request_error"))
                    return
            if opts["include_usage"]:
                yield _sse({"id": rid, "object": obj, "created": created, "model": svc.name, "choices": [],
                            "usage": _usage([finished[i] for i in range(len(reqs))])})
            yield "data: [DONE]\n\n"
        finally:  # a client that went away frees its rows at the engine's next iteration
            for r in reqs:
                if not r.finished:
                    engine.cancel(r)

    def wrap(chat: bool):
        async def endpoint(request: Request):
            try:
                return await run(request, chat)
            except _ApiError as e:
                return error(e.status, e.message, e.type, e.param, e.code)

        return endpoint

    async def http_error(request, exc):
        return error(exc.status_code, str(exc.detail) or "error", "invalid_request_error")

    async def server_error(request, exc):
        return error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    routes = [Route("/v1/models", models, methods=["GET"]),
              Route("/v1/chat/completions", wrap(True), methods=["POST"]),
              Route("/v1/completions", wrap(False), methods=["POST"]),
              Route("/health", health, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.engine = engine
    app.state.service = svc
    return app


# ======================================================================================================================
# Running it: in a thread (tests, benchmarks) or from the CLI
# ======================================================================================================================
def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServerThread:
    """uvicorn serving the app on a loopback port (0 = a free one) in a background thread."""

    def __init__(self, model: Model, *, host: str = "127.0.0.1", port: int = 0, model_name: str = "dgemma",
                 max_batch: int = DEFAULT_MAX_BATCH, batching: str = "merged", log_level: str = "warning"):
        import socket

        import uvicorn

        if not is_loopback(host):
            raise InputError(f"ServerThread binds loopback addresses only, not {host!r}")
        self.app = create_app(model, model_name=model_name, max_batch=max_batch, batching=batching)
        self.engine: Engine = self.app.state.engine
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.host = host
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(self.app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="dgemma-uvicorn")

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def served_name(path) -> str:
    p = Path(str(path))
    return p.name if p.exists() else str(path)


def vllm_command(model_ref: str, *, served_model_name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                 max_model_len: int | None = None, max_num_seqs: int | None = None) -> list[str]:
    """The `vllm serve` command line for the same checkpoint (vLLM serves DiffusionGemma natively). The flags follow
    vLLM's DiffusionGemma recipe (recipes.vllm.ai/Google/diffusiongemma-26B-A4B-it): `--max-num-seqs 4` because vLLM
    pre-allocates max_seqs x canvas x vocab self-conditioning buffers, and `--generation-config vllm` so the
    checkpoint's max_tokens default does not override per-request limits. Not run here: no vLLM in this
    environment."""
    cmd = ["vllm", "serve", str(model_ref)]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    cmd += ["--host", host, "--port", str(port)]
    if max_model_len:
        cmd += ["--max-model-len", str(int(max_model_len))]
    cmd += ["--max-num-seqs", str(int(max_num_seqs or 4)), "--generation-config", "vllm"]
    return cmd


def cli_serve(*, model_path, backend: str, host: str, port: int, max_batch: int | None, served_model_name,
              dtype, device, print_vllm_command: bool, max_model_len: int | None, batching: str = "merged",
              log_level: str = "info") -> None:
    """What `dgemma serve` does (the click command in cli.py only forwards its options here)."""
    import sys

    import click

    from .assets import default_model_path

    path = model_path if model_path is not None else default_model_path()
    name = served_model_name or served_name(path)
    if print_vllm_command:
        length = max_model_len
        local = Path(str(path))
        if (local / "config.json").exists():
            from .config import ModelConfig

            cfg = ModelConfig.from_file(local / "config.json")
            length = length or cfg.max_position_embeddings
            if cfg.raw.get("quantization"):
                click.echo("note: this is an MLX-quantized checkpoint, which vLLM cannot load; point vLLM at the "
                           "original checkpoint", err=True)
        click.echo(shlex.join(vllm_command(str(path), served_model_name=served_model_name, host=host, port=port,
                                           max_model_len=length, max_num_seqs=max_batch)))
        click.echo("note: flags from vLLM's DiffusionGemma recipe; sampler knobs (entropy bound, steps) are not "
                   "mapped onto vLLM flags", err=True)
        return
    if not is_loopback(host):
        click.echo(f"warning: serving on {host}, which is not a loopback address: the server has no "
                   "authentication", err=True)
    import uvicorn

    from .api import load
    from .backend import backend_class

    backend_class(backend)
    model = load(path, backend=backend, dtype=dtype, device=device, progress=sys.stderr.isatty())
    app = create_app(model, model_name=name, max_batch=max_batch or DEFAULT_MAX_BATCH, batching=batching)
    click.echo(f"dgemma serve: {name} on {model.backend.describe()}, max batch {max_batch or DEFAULT_MAX_BATCH} "
               f"({batching} batching), "
               f"http://{host}:{port}/v1", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
