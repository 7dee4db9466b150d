"""The one batch engine: requests move through prefill -> denoising passes -> commit -> next canvas -> done.

Every face drives it: `Model.generate` / `generate_batch` / `stream`, `dgemma generate` and `dgemma serve`. One
decoder pass steps every live row; a row is one canvas being denoised and a request owns one or more rows (parallel
attempts or views). Requests join at a canvas boundary and leave at any pass. The backend owns the batch cache; the
engine addresses its rows by position and never touches a tensor of it.

Per pass only small arrays cross to the host: the per-row mean entropy and stability flag, and, where an option
needs it, the [rows, C] token canvases (checkers, structured output, drafts). Vocabulary-sized arrays exist only
inside a pass, and for large batches only one tile of rows at a time.

Exactness: a request draws from its own noise source in the order the reference's loop does (initial canvas, then per
pass the uniforms and the re-noise tokens), so batching changes its numbers only by the rounding of batched matmuls;
`batching="exact"` runs one decoder pass per request and is bit-identical to a solo run.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np

from ..backend import Backend
from ..errors import InputError
from ..kvlayout import width_bucket
from ..sampler import step_with_temperature, temperature
from .prompt_cache import PromptCache
from .request import (SPEEDS, CanvasEvent, DoneEvent, DraftEvent, FailedEvent, FastPolicy, Handle, Request,
                      RequestResult, as_checker)
from .state import Job, Row, pad_after_eos, visible_tokens

BATCHING_MODES = ("merged", "exact")
VOCAB_TILE_BYTES = 1 << 30   # the sampler's vocabulary-sized arrays for at most this many bytes of logits at once
REPAIR_CANDIDATES = 16       # structured output: top-k tokens per position kept for the repair of a stopped canvas


def attempt_seed(seed: int, attempt: int) -> int:
    """The seed of parallel attempt `attempt` at a request seeded `seed` (attempt 0 is the request's own draw, so
    attempts=1 generates exactly what a plain call does)."""
    return (int(seed) + attempt * 0x9E3779B97F4A7C15) % (1 << 63)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=bool)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = True
    return ids, mask


class Engine:
    def __init__(self, backend: Backend, *, max_batch: int | None = None, batching: str = "merged",
                 prompt_cache: PromptCache | None = None, vocab_tile_bytes: int = VOCAB_TILE_BYTES):
        if batching not in BATCHING_MODES:
            raise InputError(f"batching must be one of {', '.join(BATCHING_MODES)}, not {batching!r}")
        if max_batch is not None and max_batch < 1:
            raise InputError("max_batch must be at least 1")
        self.backend, self.ops, self.cfg = backend, backend.ops, backend.config
        self.max_batch, self.batching = max_batch, batching
        self.prompt_cache = prompt_cache
        if prompt_cache is not None:
            prompt_cache.chunk = backend.prefill_chunk  # entries sit at the prefill's own chunk boundaries
        self.vocab_tile_bytes = vocab_tile_bytes
        self.cache = None                       # the backend's batch cache, rows in the order of self.rows
        self.rows: list[Row] = []
        self.waiting: deque[list[Job]] = deque()
        self.jobs: dict[int, Job] = {}
        self.events: list = []
        self._batch = None                      # the last pass's batch arrays, reused while its rows stay the same
        self.counters = {"decoder_passes": 0, "rows_denoised": 0, "prefills": 0, "commits": 0, "completed": 0,
                         "cancelled": 0, "failed": 0, "max_rows_seen": 0, "cached_tokens": 0}

    # == the caller's side ==========================================================================================
    def submit(self, request: Request) -> Handle:
        return self.submit_group([request])[0]

    def submit_group(self, requests: Sequence[Request]) -> list[Handle]:
        """Requests that join together; without a prompt cache they share one left-padded prefill (what the
        reference does for a batch, so their positions are the reference's)."""
        jobs = []
        for req in requests:
            self._validate(req)
            handle = Handle(req)
            jobs.append(Job(handle, req.prompts()))
        for job in jobs:
            job.checker = as_checker(job.request.checker)
            self.jobs[job.handle.id] = job
        self.waiting.append(jobs)
        return [j.handle for j in jobs]

    def cancel(self, handle: Handle) -> None:
        handle.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or bool(self.rows)

    def stats(self) -> dict:
        return {"rows": len(self.rows), "live_rows": sum(r.live for r in self.rows),
                "waiting": sum(len(g) for g in self.waiting), "requests": len(self.jobs), **self.counters,
                "cache_bytes": self.cache.nbytes() if self.cache is not None and self.cache.rows else 0,
                **({"prompt_cache": self.prompt_cache.stats()} if self.prompt_cache is not None else {})}

    def run(self, handles: Sequence[Handle]) -> Iterator:
        """Step until `handles` are done, yielding their events."""
        mine = {h.id for h in handles}
        while not all(h.done for h in handles):
            for ev in self.step():
                if ev.handle.id in mine:
                    yield ev

    def step(self) -> list:
        """One engine iteration: drop cancelled requests, admit newcomers, one decoder pass, finish canvases."""
        self.events = []
        self._drop_cancelled()
        self._admit()
        if any(r.live for r in self.rows):
            self._pass()
        self._finish_canvases()
        if not self.busy:
            self.ops.release_buffers()  # an idle engine holds no vocabulary-sized buffers
        return self.events

    # == validation ===================================================================================================
    def _validate(self, req: Request) -> None:
        cfg, s = self.cfg, req.settings
        if req.views is not None and req.attempts != 1:
            raise InputError("give either attempts or views, not both")
        if not isinstance(req.attempts, int) or req.attempts < 1:
            raise InputError(f"attempts must be a whole number >= 1 (got {req.attempts!r})")
        if req.max_retries < 0:
            raise InputError(f"max_retries must be >= 0 (got {req.max_retries})")
        if (req.width > 1 or req.stop_when_valid) and req.checker is None:
            raise InputError("parallel attempts and stop_when_valid need a checker to tell a right canvas")
        if req.noise is not None and req.width > 1 and (not isinstance(req.noise, (list, tuple))
                                                         or len(req.noise) != req.width):
            raise InputError("give seeds, not noise sources, with attempts > 1 (each attempt draws its own noise)")
        if req.noise is None and req.seed is None:
            raise InputError("a request needs a seed or a noise source")
        if req.speed not in SPEEDS:
            raise InputError(f"speed must be one of {', '.join(SPEEDS)}, not {req.speed!r}")
        if req.speed == "fast" and req.constraint is not None:
            raise InputError("structured output runs with speed='exact' (its repair needs every position's logits)")
        prompts = req.prompts()
        if not prompts:
            raise InputError("no prompt given")
        for p in prompts:
            if not p:
                raise InputError("the prompt is empty")
            bad = [t for t in p if not 0 <= t < cfg.vocab_size]
            if bad:
                raise InputError(f"the prompt has token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
        C = cfg.canvas_length
        longest = max(len(p) for p in prompts)
        needed = longest + -(-s.max_new_tokens // C) * C
        if needed > cfg.max_position_embeddings:
            raise InputError(f"prompt of {longest} tokens plus {s.max_new_tokens} new tokens (rounded up to whole "
                             f"canvases of {C}) needs {needed} positions; the model has "
                             f"{cfg.max_position_embeddings}")

    # == joining and leaving ==========================================================================================
    def _drop_cancelled(self) -> None:
        gone = {j.handle.id for j in self.jobs.values() if j.handle.cancelled}
        if not gone:
            return
        self.counters["cancelled"] += len(gone)
        self.waiting = deque([j for j in g if j.handle.id not in gone] for g in self.waiting)
        self.waiting = deque(g for g in self.waiting if g)
        for i in gone:
            self.jobs.pop(i, None)
        self._keep([r for r in self.rows if r.job.handle.id not in gone])

    def _keep(self, rows: list[Row]) -> None:
        """Reorder the cache to `rows` (dropping the others): a copy made at canvas boundaries, never in a pass."""
        if [id(r) for r in rows] == [id(r) for r in self.rows]:
            return
        slot = {id(r): i for i, r in enumerate(self.rows)}
        if self.cache is not None:
            self.cache.take(np.array([slot[id(r)] for r in rows], dtype=np.int64))
        self.rows = rows
        self._batch = None

    def _admit(self) -> None:
        budget = self.cfg.canvas_length * max(1, sum(r.live for r in self.rows))
        used = 0
        while self.waiting:
            group = self.waiting[0]
            width = sum(j.request.width for j in group)
            if self.rows and self.max_batch is not None and len(self.rows) + width > self.max_batch:
                return
            tokens = sum(len(p) for j in group for p in j.prompts)
            if self.rows and used and used + tokens > budget:
                return  # a newcomer's prefill stalls the running rows by about one pass at most
            self.waiting.popleft()
            used += tokens
            try:
                self._prefill(group)
            except Exception as e:  # a failed prefill fails its requests; the engine keeps serving
                for job in group:
                    self._fail(job, e)
                continue
            for job in group:
                self._start_canvas(job, job.active_rows())

    def _prefill(self, group: list[Job]) -> None:
        self.counters["prefills"] += 1
        if self.prompt_cache is not None and len(group) == 1 and group[0].request.cacheable:
            prefill, src = self._prefill_cached(group[0])
        else:
            prefill, src = self._prefill_padded(group)
        start = len(self.rows)
        if self.cache is None or not self.cache.rows:
            if len(src) == prefill.rows and (np.asarray(src) == np.arange(prefill.rows)).all():
                self.cache = prefill  # nothing running: the new rows' cache is the batch cache
            else:
                self.cache = self.backend.new_cache()
        if self.cache is not prefill:
            dst = self.cache.add_rows(len(src))
            for j, s in enumerate(src):
                self.cache.copy_rows_from(prefill, slice(s, s + 1), slice(dst.start + j, dst.start + j + 1))
        for job in group:
            for i, prompt in enumerate(job.prompts):
                req = job.request
                if isinstance(req.noise, (list, tuple)):
                    noise = req.noise[i]
                elif req.noise is not None:
                    noise = req.noise
                else:
                    noise = self.backend.row_noise(attempt_seed(req.seed, i))
                checker_row = req.checker_rows[i] if req.checker_rows is not None else 0
                row = Row(job, i, noise, checker_row)
                row.fast = (req.fast or FastPolicy()) if req.speed == "fast" else None
                job.rows.append(row)
            self.rows.extend(job.rows)
        assert len(self.rows) == self.cache.rows == start + len(src)
        self._batch = None

    def _prefill_padded(self, group: list[Job]):
        """One left-padded prefill of the group's distinct prompts; returns (cache, source row of each new row)."""
        distinct: dict[tuple, int] = {}
        src = []
        for job in group:
            images = id(job.request.input_embeds)  # equal ids with different images are different prompts
            for p in job.prompts:
                src.append(distinct.setdefault((tuple(p), images), len(distinct)))
        prompts = [list(p) for p, _ in distinct]
        pad = group[0].settings.pad_token_id
        ids, mask = left_pad(prompts, pad if pad is not None else 0)
        embeds = blocks = None
        if any(j.request.input_embeds is not None for j in group):
            embeds, blocks = self._padded_images(group, distinct, ids.shape[1])
        return self.backend.prefill(ids, mask, input_embeds=embeds, image_blocks=blocks), src

    def _padded_images(self, group, distinct, width):
        """Left-padded prompt embeddings and image blocks for a group where some prompts carry images (the others
        get their token embeddings from the backend's own table, as rows of zeros in `image_blocks`)."""
        rows = []
        for p, images in distinct:
            job = next(j for j in group if tuple(j.prompts[0]) == p and id(j.request.input_embeds) == images)
            rows.append((len(p), job.request.input_embeds, job.request.image_blocks))
        ref = next(e for _, e, _ in rows if e is not None)
        hidden = np.asarray(ref).shape[-1]
        embeds = np.zeros((len(rows), width, hidden), np.float32)
        blocks = np.zeros((len(rows), width), np.int64)
        for i, (n, e, b) in enumerate(rows):
            if e is None:
                raise InputError("in one batch, either every prompt or none carries images (submit them apart)")
            embeds[i, width - n:] = np.asarray(e, np.float32)
            blocks[i, width - n:] = np.asarray(b)
        return embeds, blocks

    def _prefill_cached(self, job: Job):
        """Prefill one request through the prompt cache: reuse the longest cached prefix (whole prefill chunks),
        encode the rest chunk by chunk, and remember the new chunk boundaries. The chunks are those of a fresh
        prefill, so a hit computes exactly the numbers a miss does (images included: their embeddings are part of
        the key, and the tower's output is what the request carries)."""
        prompt, req = job.prompts[0], job.request
        if any(list(p) != list(prompt) for p in job.prompts[1:]):
            return self._prefill_padded([job])
        embeds = None if req.input_embeds is None else np.asarray(req.input_embeds, dtype=np.float32)
        blocks = None if req.image_blocks is None else np.asarray(req.image_blocks)
        chunks = self.backend.prefill_chunks(len(prompt), None if blocks is None else blocks[None])
        bounds = [b for _, b in chunks]
        cached, length = self.prompt_cache.lookup(prompt, bounds, embeds, blocks)
        cache = self.backend.new_cache()
        rows = cache.add_rows(1)
        if cached is not None:
            cache.copy_rows_from(cached, slice(0, 1), rows)
        job.cached_tokens = job.handle.cached_tokens = length
        self.counters["cached_tokens"] += length
        for n, (a, b) in enumerate(chunks, 1):
            if b <= length:
                continue
            self.backend.extend(cache, np.asarray([prompt[a:b]]), rows,
                                input_embeds=None if embeds is None else embeds[None, a:b],
                                image_blocks=None if blocks is None else blocks[None, a:b])
            # A snapshot copies the whole prefix, so keep O(log) of them: after 1, 2, 4, 8 ... chunks (a later prompt
            # sharing k chunks reuses at least half of them) and the last two boundaries (a resent or extended prompt).
            if n & (n - 1) == 0 or n >= len(chunks) - 1:
                self.prompt_cache.insert(prompt[:b], self.backend.select_rows(cache, [0]), bounds[:n], embeds, blocks)
        return cache, [0] * len(job.prompts)

    # == canvases =====================================================================================================
    def _start_canvas(self, job: Job, rows: list[Row], start=None) -> None:
        """New denoising round for `rows`: fresh noise, or (a retry) the finished canvas with its flagged positions
        re-noised."""
        C, V = self.cfg.canvas_length, self.cfg.vocab_size
        for row in rows:
            row.base = job.retry_round * (job.settings.max_denoising_steps + 1)
            canvas = row.noise.tokens(job.block, row.base, C, V)
            if start is not None:
                bad, tokens = start
                canvas = self.ops.where(self.ops.from_numpy(bad), canvas, self.ops.from_numpy(tokens))
            row.canvas, row.argmax, row.soft = canvas, canvas, None
            row.step, row.stable, row.live, row.passed, row.mask_at, row.mask = 0, 0, True, False, -1, None
            if row.fast is not None:
                row.frozen, row.just_froze = np.zeros(C, bool), np.zeros(C, bool)
                row.frozen_tokens, row.settle = np.zeros(C, np.int64), np.zeros(C, np.int64)
                row.pos_entropy, row.prev_argmax, row.check_next = np.zeros(C, np.float64), None, False
            if start is None:
                row.steps = 0
        self._batch = None

    # == one decoder pass =============================================================================================
    def _pass(self) -> None:
        span = self._pass_span()
        if self.batching == "exact":
            for job in dict.fromkeys(r.job for r in self.rows[span] if r.live):
                idx = [i for i in range(span.start, span.stop) if self.rows[i].job is job and self.rows[i].live]
                self._denoise(slice(idx[0], idx[-1] + 1))
        else:
            self._denoise(span)

    def _pass_span(self) -> slice:
        """The rows the next pass runs over: a prefix of the cache holding every live row. Idle rows inside it
        (attempts that stopped before their group) are computed and ignored until they are an eighth of it; then
        the cache is reordered, live rows first."""
        live = [i for i, r in enumerate(self.rows) if r.live]
        k = live[-1] + 1
        idle = k - len(live)
        if idle and idle >= max(1, k // 8):
            self._keep([r for r in self.rows if r.live] + [r for r in self.rows if not r.live])
            k = len(live)
        return slice(0, k)

    def _batch_arrays(self, span: slice, rows: list[Row]):
        """canvas [k, C] and self-conditioning [k, C, H] (None when no row has any) of the pass."""
        b = self._batch
        if b is not None and b[0] == span and len(b[1]) == len(rows) and all(x is y for x, y in zip(b[1], rows)) \
                and all(r.step > 0 or not r.live for r in rows):
            return b[2], b[3]
        ops = self.ops
        canvas = ops.stack_rows([r.canvas for r in rows])
        have = [r.soft for r in rows if r.soft is not None]
        if not have:
            return canvas, None
        # A row at its first pass gets zeros: exactly the "no self-conditioning" signal (the MLP of zero is zero).
        zero = ops.full(tuple(have[0].shape), 0.0, like=have[0])
        return canvas, ops.stack_rows([r.soft if r.soft is not None else zero for r in rows])

    def _denoise(self, span: slice) -> None:
        rows = self.rows[span]
        groups = self._pass_groups(rows)
        parts = [self._denoise_rows(slice(span.start + g.start, span.start + g.stop), rows[g]) for g in groups]
        out, fresh = parts[0] if len(parts) == 1 else self._merge_passes(parts, groups)
        self._after_pass(span, rows, out, fresh)

    def _denoise_rows(self, span: slice, rows: list[Row]) -> tuple[dict, object]:
        """One decoder pass over rows `span` (the whole batch, or one run of it in fast mode)."""
        canvas, soft = self._batch_arrays(span, rows)
        positions = self._active_positions(rows)
        uniforms, fresh = self._draws(rows)
        if positions is None:
            hidden = self.backend.denoise_hidden(self.cache, canvas, soft, rows=span)
            out = self._sample(rows, hidden, canvas, uniforms, fresh)
        else:
            out = self._denoise_active(span, rows, canvas, soft, positions, uniforms, fresh)
        self.counters["decoder_passes"] += 1
        self.counters["rows_denoised"] += len(rows)
        self.counters["max_rows_seen"] = max(self.counters["max_rows_seen"], len(rows))
        if any(r.live and r.fast is not None for r in rows):
            self._fast_bookkeeping(rows, out, positions)
        out["partial"] = np.full(len(rows), positions is not None)
        return out, fresh

    def _merge_passes(self, parts: list, groups: list[slice]) -> tuple[dict, object]:
        """The outputs of several passes over consecutive runs of rows, as one pass over all of them."""
        outs = [o for o, _ in parts]
        merged = {k: self._concat([o[k] for o in outs]) for k in ("canvas", "argmax", "soft", "accepted")}
        merged["entropy"] = np.concatenate([self._host_entropy(o["entropy"]) for o in outs])
        merged["partial"] = np.concatenate([o["partial"] for o in outs])
        merged["candidates"] = {g.start + j: c for g, o in zip(groups, outs) for j, c in o["candidates"].items()}
        return merged, self._concat([f for _, f in parts])

    # -- fast mode: forward only the positions still changing ---------------------------------------------------------
    def _row_active(self, r: Row):
        """The canvas positions a live row's next pass must forward: None for all of them (exact mode, nothing
        frozen yet, a refresh, or a check of a confident-looking partial pass), else the active mask (the positions
        not frozen, and those that froze on the last pass, so their keys/values reflect their final token)."""
        p = r.fast
        if p is None or r.frozen is None or not r.frozen.any() or r.check_next or (
                p.refresh_every and (r.step + 1) % p.refresh_every == 0):
            return None
        return ~r.frozen | r.just_froze

    def _pass_groups(self, rows: list[Row]) -> list[slice]:
        """Consecutive runs of rows, each denoised in a pass of its own. A pass is as wide as its widest row, so in
        one pass a row that needs every position makes the others forward their frozen ones too (37% of the
        positions forwarded for a batch of 32 Sudoku puzzles, 55% with requests joining at different times). The
        runs minimise passes x the backend's `pass_cost_tokens` + the positions forwarded (dynamic programming
        over the cut points); a GPU backend's infinite cost keeps one pass."""
        cost = self.backend.pass_cost_tokens
        if len(rows) < 2 or cost == float("inf") or not any(r.live and r.fast is not None for r in rows):
            return [slice(0, len(rows))]
        C = self.cfg.canvas_length
        need = [0 if not r.live else C if (a := self._row_active(r)) is None else int(a.sum()) for r in rows]
        best, cut = [0.0] + [float("inf")] * len(rows), [0] * (len(rows) + 1)
        for i in range(1, len(rows) + 1):
            widest = 0
            for j in range(i - 1, -1, -1):
                widest = max(widest, need[j])
                total = best[j] + cost + widest * (i - j)
                if total < best[i]:
                    best[i], cut[i] = total, j
        groups, i = [], len(rows)
        while i:
            groups.append(slice(cut[i], i))
            i = cut[i]
        return groups[::-1]

    def _active_positions(self, rows: list[Row]):
        """(positions [k, A], used [k, A]) to forward when every live row of the pass is in fast mode with frozen
        positions; None for a full pass. Rows with fewer active positions are padded with frozen ones (forwarded
        again, their results dropped), so a pass runs at the width of its widest row, rounded up to a shape bucket
        (`width_bucket`: a compiled backend traces a few widths, not one per pass); a pass that would forward 7/8 of
        the canvas or more runs full."""
        C = self.cfg.canvas_length
        actives = []
        for r in rows:
            actives.append(None if not r.live else self._row_active(r))
            if r.live and actives[-1] is None:
                return None
        width = width_bucket(max(1, *(int(a.sum()) for a in actives if a is not None)), C)  # never an empty pass
        if 8 * width >= 7 * C:  # gathering and scattering cost more than the eighth it saves (text model: 0.91x)
            return None
        idx = np.zeros((len(rows), width), np.int64)
        used = np.zeros((len(rows), width), bool)
        for j, a in enumerate(actives):
            if a is None:
                idx[j] = np.arange(width)
                continue
            act = np.flatnonzero(a)
            sel = np.sort(np.concatenate([act, np.flatnonzero(~a)[: width - act.size]]))
            idx[j], used[j] = sel, a[sel]
        return idx, used

    def _denoise_active(self, span, rows, canvas, soft, positions, uniforms, fresh) -> dict:
        """A fast pass: the decoder, LM head, sampler and self-conditioning on the forwarded positions only; the
        results go back into whole canvases (positions forwarded as padding keep what they had)."""
        ops = self.ops
        idx, used = positions
        sub_canvas = ops.take_along(canvas, idx)
        sub_soft = None if soft is None else ops.take_along(soft, idx)
        hidden = self.backend.denoise_hidden(self.cache, sub_canvas, sub_soft, rows=span, positions=idx)
        spent = np.zeros(len(rows))
        for j, r in enumerate(rows):  # the entropy of the frozen positions this pass does not forward
            if r.live and r.fast is not None:
                left_out = r.frozen.copy()
                left_out[idx[j]] = False
                spent[j] = r.pos_entropy[left_out].sum()
        out = self._sample(rows, hidden, sub_canvas, ops.take_along(uniforms, idx), ops.take_along(fresh, idx),
                           spent)
        use = ops.from_numpy(used)
        argmax = ops.stack_rows([r.argmax for r in rows])
        if soft is None:
            soft = ops.full((len(rows), self.cfg.canvas_length, out["soft"].shape[-1]), 0.0, like=out["soft"])
        every = ops.from_numpy(np.ones((len(rows), self.cfg.canvas_length), bool))
        return {"canvas": ops.put_along(canvas, idx, ops.where(use, out["canvas"], sub_canvas)),
                "argmax": ops.put_along(argmax, idx, ops.where(use, out["argmax"], ops.take_along(argmax, idx))),
                "soft": ops.put_along(soft, idx, out["soft"]),
                "accepted": ops.put_along(every, idx, ops.where(use, out["accepted"], every[:, : idx.shape[1]])),
                "entropy": out["entropy"], "pos_entropy": out["pos_entropy"], "candidates": {}}

    def _fast_bookkeeping(self, rows: list[Row], out: dict, positions) -> None:
        """Per position of each fast row: its entropy, how long its argmax has held, whether it freezes; frozen
        positions keep their token; the row's mean entropy (the stopping rule's) covers every position."""
        ops = self.ops
        host_argmax = np.asarray(ops.to_numpy(out["argmax"]), dtype=np.int64)
        ent = np.asarray(ops.to_numpy(out["pos_entropy"]), dtype=np.float64)
        means = np.asarray(ops.to_numpy(out["entropy"]), dtype=np.float64).reshape(-1).copy()
        for j, r in enumerate(rows):
            if not r.live or r.fast is None:
                continue
            if positions is None:
                r.pos_entropy[:] = ent[j]
            else:
                idx, used = positions
                r.pos_entropy[idx[j][used[j]]] = ent[j][used[j]]
            p = r.fast
            if positions is None:
                # a full pass saw every position anew: a frozen one whose argmax moved, or that is no longer sure, is
                # denoised again (its stale keys/values had kept its neighbours from seeing it was wrong)
                thaw = r.frozen & ((host_argmax[j] != r.frozen_tokens) | (r.pos_entropy >= p.freeze_entropy))
                r.frozen &= ~thaw
                r.settle[thaw] = 0
            now = np.where(r.frozen, r.frozen_tokens, host_argmax[j])
            same = now == r.prev_argmax if r.prev_argmax is not None else np.zeros_like(r.frozen)
            r.settle = np.where(same & (r.pos_entropy < r.fast.freeze_entropy), r.settle + 1, 0)
            r.just_froze = ~r.frozen & (r.settle >= r.fast.freeze_after)
            r.frozen_tokens[r.just_froze] = now[r.just_froze]
            r.frozen |= r.just_froze
            r.prev_argmax = now
            means[j] = r.pos_entropy.mean()
        out["entropy"] = means
        out["canvas"], out["argmax"] = self._hold_frozen(rows, out["canvas"], out["argmax"])

    def _stop_on_full_passes(self, rows: list[Row], stop: np.ndarray, entropy, partial_pass: np.ndarray) -> None:
        """A fast row stops only on a full pass (or at its last step): on a partial one the frozen positions'
        entropies and keys/values are stale, and trusting them stopped Sudoku canvases early and wrong (issue 19). A
        partial pass that looks confident makes the row's next pass full, where the stopping rule is exact's."""
        for j, r in enumerate(rows):
            if r.live and r.fast is not None:
                partial = partial_pass[j] and r.step < r.job.settings.max_denoising_steps
                r.check_next = partial and entropy[j] < r.job.settings.confidence_threshold
                stop[j] &= not partial

    def _hold_frozen(self, rows: list[Row], canvas, argmax):
        """Frozen positions keep the token they froze with, in the canvas and in the argmax canvas."""
        frozen = [r.frozen if r.fast is not None and r.frozen is not None else None for r in rows]
        if not any(f is not None and f.any() for f in frozen):
            return canvas, argmax
        C = self.cfg.canvas_length
        mask = np.stack([f if f is not None else np.zeros(C, bool) for f in frozen])
        tokens = np.stack([r.frozen_tokens if f is not None else np.zeros(C, np.int64) for r, f in zip(rows, frozen)])
        m, t = self.ops.from_numpy(mask), self.ops.from_numpy(tokens)
        return self.ops.where(m, t, canvas), self.ops.where(m, t, argmax)

    def _draws(self, rows: list[Row]):
        """Each live row's uniforms, then its re-noise tokens, keyed as the reference's loop draws them."""
        ops, C, V = self.ops, self.cfg.canvas_length, self.cfg.vocab_size
        zf, zi = np.zeros(C, np.float32), np.zeros(C, np.int64)
        uniforms = ops.stack_rows([r.noise.uniforms(r.job.block, r.base + r.step + 1, C) if r.live
                                   else ops.from_numpy(zf) for r in rows])
        fresh = ops.stack_rows([r.noise.tokens(r.job.block, r.base + r.step + 1, C, V) if r.live
                                else ops.from_numpy(zi) for r in rows])
        return uniforms, fresh

    def _schedule(self, rows: list[Row], spent=None):
        """Per-row temperature and entropy bound: plain floats when the rows agree (the reference's scalar
        arithmetic), else [k, 1, 1] and [k, 1] arrays. `spent` (fast mode) is the entropy the frozen positions
        already take of each row's bound: they are the canvas's surest positions, so in the full computation they
        come first in the acceptance order."""
        ts, bounds = [], []
        for j, r in enumerate(rows):
            s = r.job.settings
            N = s.max_denoising_steps
            ts.append(temperature(max(N - r.step, 1), N, s.t_min, s.t_max))
            bounds.append(s.entropy_bound if spent is None else max(s.entropy_bound - spent[j], 0.0))
        if len(set(ts)) == 1 and len(set(bounds)) == 1:
            return ts[0], bounds[0]
        ops = self.ops
        return (ops.from_numpy(np.asarray(ts, np.float32)[:, None, None]),
                ops.from_numpy(np.asarray(bounds, np.float32)[:, None]))

    def _tiles(self, n: int) -> list[slice]:
        per_row = self.cfg.canvas_length * self.cfg.vocab_size * 4 * 4  # logits + log-probs + probs + a temporary
        size = max(1, self.vocab_tile_bytes // per_row)
        return [slice(a, min(a + size, n)) for a in range(0, n, size)]

    def _sample(self, rows, hidden, canvas, uniforms, fresh, spent=None) -> dict:
        """LM head, logit masks, sampler step and next self-conditioning, one tile of rows at a time."""
        ops = self.ops
        parts: dict[str, list] = {k: [] for k in ("canvas", "argmax", "soft", "entropy", "accepted", "pos_entropy")}
        candidates = {}
        for tile in self._tiles(len(rows)):
            tile_rows = rows[tile]
            logits = self.backend.lm_logits(hidden[tile] if tile != slice(0, len(rows)) else hidden)
            logits = self._mask_logits(logits, tile_rows)
            t, bound = self._schedule(tile_rows, None if spent is None else spent[tile])
            one = tile == slice(0, len(rows))
            pick = (lambda x: x) if one else (lambda x: x[tile])
            step = ops.fused_step
            if step is not None:
                res = step(logits, pick(canvas), t, bound, pick(uniforms), pick(fresh), reuse=True)
            else:
                res = step_with_temperature(ops, logits, pick(canvas), t, bound, pick(uniforms), pick(fresh),
                                            owns_logits=True)
            next_canvas, argmax, probs, mean_entropy, accepted, pos_entropy = res
            for j, r in enumerate(tile_rows):
                if r.live and r.job.request.constraint is not None:
                    candidates[tile.start + j] = ops.top_k(probs[j], REPAIR_CANDIDATES)
            for k, v in zip(("canvas", "argmax", "entropy", "accepted", "pos_entropy"),
                            (next_canvas, argmax, mean_entropy, accepted, pos_entropy)):
                parts[k].append(v)
            parts["soft"].append(self.backend.soft_embedding(probs))
            if tile.stop - tile.start < len(rows):  # several tiles: finish this one before the next one's arrays
                ops.settle(*(v[-1] for v in parts.values() if v))
            del logits, probs, res
        out = {k: v[0] if len(v) == 1 else self._concat(v) for k, v in parts.items()}
        out["candidates"] = candidates
        return out

    def _concat(self, arrays: list):
        return self.ops.stack_rows([row for a in arrays for row in (a[i] for i in range(a.shape[0]))])

    def _mask_logits(self, logits, rows: list[Row]):
        """Structured output: the logits of each constrained row's first broken position keep only the allowed
        tokens (the mask crosses to the device once per such row and pass)."""
        for j, r in enumerate(rows):
            if r.live and r.mask is not None and 0 <= r.mask_at:
                logits = self.ops.mask_position(logits, j, r.mask_at, r.mask)
        return logits

    # == after a pass: stopping, checkers, drafts ====================================================================
    def _after_pass(self, span: slice, rows: list[Row], out: dict, fresh) -> None:
        ops = self.ops
        canvas, argmax = out["canvas"], out["argmax"]
        entropy = self._host_entropy(out["entropy"])
        same = self._same_as_before(rows, argmax)
        stop = np.zeros(len(rows), bool)
        for j, r in enumerate(rows):
            if not r.live:
                continue
            s = r.job.settings
            r.step += 1
            r.steps += 1
            r.passes += 1
            r.stable = r.stable + 1 if same[j] else 0
            confident = entropy[j] < s.confidence_threshold
            stable = s.stability_threshold == 0 or r.stable >= s.stability_threshold
            stop[j] = (confident and stable) or r.step >= s.max_denoising_steps
        self._stop_on_full_passes(rows, stop, entropy, out["partial"])
        canvas = self._renoise(rows, canvas, out["accepted"], fresh)  # thaws what it re-noises (fast mode)
        host_argmax = self._judge(rows, argmax, stop)
        for j, r in enumerate(rows):
            if r.live:
                r.canvas, r.argmax, r.soft = canvas[j], argmax[j], out["soft"][j]
                r.candidates = out["candidates"].get(j)
        for j, r in enumerate(rows):
            if r.live and stop[j]:
                r.live = False
        self._report_pass(rows, argmax, out["accepted"], host_argmax)
        self._batch = (span, list(rows), canvas, out["soft"])

    def _host_entropy(self, entropy) -> np.ndarray:
        """A pass's mean entropies [k] on the host (fast mode's bookkeeping has already brought them there)."""
        if not isinstance(entropy, np.ndarray):
            entropy = np.asarray(self.ops.to_numpy(entropy), dtype=np.float64)
        return entropy.reshape(-1)

    def _same_as_before(self, rows: list[Row], argmax) -> np.ndarray:
        """Per row: whether this pass's argmax canvas equals the previous pass's (of the same round)."""
        ops = self.ops
        prev = [j for j, r in enumerate(rows) if r.live and r.step > 0]
        same = np.zeros(len(rows), bool)
        if prev:
            before = ops.stack_rows([rows[j].argmax for j in prev])
            now = argmax if len(prev) == len(rows) else ops.take_rows(argmax, np.asarray(prev))
            same[prev] = np.asarray(ops.to_numpy(ops.all_equal(before, now))).reshape(-1)
        return same

    def _renoise(self, rows: list[Row], canvas, accepted, fresh):
        """Constraint-aware sampling: accepted tokens a checker flags, and (structured output) every position from
        the first one the grammar rejects, are re-noised like low-confidence ones."""
        ops = self.ops
        check = [j for j, r in enumerate(rows) if r.live and r.job.request.checker is not None
                 and r.job.request.renoise]
        grammar = [j for j, r in enumerate(rows) if r.live and r.job.request.constraint is not None]
        if not check and not grammar:
            return canvas
        host = np.asarray(ops.to_numpy(canvas), dtype=np.int64)
        acc = np.asarray(ops.to_numpy(accepted), dtype=bool)
        bad = np.zeros(host.shape, bool)
        if check:
            bad[check] = self._violations(rows, check, host[check]) & acc[check]
            for j in check:  # fast mode: a frozen position a checker flags is denoised again
                r = rows[j]
                if r.fast is not None and bad[j].any():
                    r.frozen &= ~bad[j]
                    r.settle[bad[j]] = 0
        for j in grammar:
            r = rows[j]
            first, allowed = r.job.request.constraint.scan(host[j], acc[j])
            r.mask_at, r.mask = (first, allowed) if first < host.shape[1] else (-1, None)
            bad[j, first:] = True
        if not bad.any():
            return canvas
        return ops.where(ops.from_numpy(bad), fresh, canvas)

    def _violations(self, rows: list[Row], which: list[int], tokens: np.ndarray) -> np.ndarray:
        """Checker flags [n, C] for the canvases `tokens` of rows `which`; one `many` call per checker object."""
        out = np.zeros(tokens.shape, bool)
        by_checker: dict[int, list[int]] = {}
        for n, j in enumerate(which):
            by_checker.setdefault(id(rows[j].job.request.checker), []).append(n)
        for lines in by_checker.values():
            checker = rows[which[lines[0]]].job.checker
            ids = np.asarray([rows[which[n]].checker_row for n in lines])
            out[lines] = np.asarray(checker.many(ids, tokens[lines]), dtype=bool)
        return out

    def _judge(self, rows: list[Row], argmax, stop: np.ndarray):
        """With a verifying checker: a live row whose argmax canvas passes stops (stop_when_valid), and a right
        attempt ends its whole group. Returns the host argmax canvases when they were copied."""
        need = [j for j, r in enumerate(rows) if r.live and r.job.request.checker is not None
                and (r.job.request.stop_when_valid or (r.job.request.width > 1 and stop[j]))]
        if not need:
            return None
        host = np.asarray(self.ops.to_numpy(argmax), dtype=np.int64)
        ok = ~self._violations(rows, need, host[need]).any(axis=1)
        for n, j in enumerate(need):
            r = rows[j]
            if r.job.request.stop_when_valid:
                stop[j] |= ok[n]
            if ok[n] and stop[j]:
                r.passed = True
        for j, r in enumerate(rows):
            if r.live and r.job.request.width > 1 and any(x.passed for x in r.job.rows):
                stop[j] = True
        return host

    def _report_pass(self, rows: list[Row], argmax, accepted, host_argmax) -> None:
        ops = self.ops
        for job in dict.fromkeys(r.job for r in rows if r.job.request.on_step or r.job.request.drafts):
            idx = np.asarray([j for j, r in enumerate(rows) if r.job is job])
            step = max(rows[j].step for j in idx)
            if job.request.on_step is not None:
                job.request.on_step(job.block, step, ops.take_rows(argmax, idx), ops.take_rows(accepted, idx))
            if job.request.drafts:
                j = int(idx[0])
                toks = host_argmax[j] if host_argmax is not None else np.asarray(ops.to_numpy(argmax[j]))
                acc = np.asarray(ops.to_numpy(accepted[j]), dtype=bool)
                self.events.append(DraftEvent(job.handle, job.block, step, np.asarray(toks, np.int64), acc))

    # == finished canvases: choose, retry, commit, next ==============================================================
    def _finish_canvases(self) -> None:
        commits: list[tuple[Job, np.ndarray]] = []
        finished: list[Job] = []
        for job in dict.fromkeys(r.job for r in self.rows):
            if job.finished or not job.canvas_over():
                continue
            try:
                tokens = self._close_canvas(job)
            except Exception as e:
                self._fail(job, e)
                continue
            if tokens is None:
                continue  # a retry round started
            if job.finished:
                finished.append(job)
            else:
                commits.append((job, tokens))
        self._commit(commits)
        for job in finished:
            self._done(job)
        if finished or any(r.retired for r in self.rows):
            self._keep([r for r in self.rows if not r.job.finished and not r.retired])

    def _close_canvas(self, job: Job):
        """Choose the canvas its rows keep, maybe start a retry round; else record the canvas and emit it. Returns
        the tokens to commit (None when a retry started)."""
        ops, s, C = self.ops, job.settings, self.cfg.canvas_length
        active = job.active_rows()
        pick = self._choose(job, active)
        tokens = np.asarray(ops.to_numpy(pick.argmax), dtype=np.int64).reshape(-1)
        if self._maybe_retry(job, pick, tokens):
            return None
        constraint = job.request.constraint
        accepted = False
        if constraint is not None:
            tokens, accepted = self._repair(pick, tokens)
        tokens, hit_eos = pad_after_eos(tokens, s.eos_token_ids, s.pad_token_id)
        hit_eos = hit_eos or accepted
        steps = max(r.steps for r in active)
        passes = max(r.passes for r in job.rows)
        views = job.request.views is not None
        for r in job.rows:
            r.passes = passes
        for r in active:
            own = tokens if (r is pick or not views) else pad_after_eos(
                np.asarray(ops.to_numpy(r.argmax), dtype=np.int64).reshape(-1), s.eos_token_ids, s.pad_token_id)[0]
            r.raw.extend(int(t) for t in own)
            r.steps_per_canvas.append(steps)
            r.chosen.append(r is pick or not views)
            if views and r is not pick:
                r.retired = True
        finished = hit_eos or (job.block + 1) * C >= s.max_new_tokens
        self.events.append(CanvasEvent(job.handle, job.block, tokens, steps, job.retries_this_block, finished,
                                       hit_eos))
        job.finished = finished
        job.retry_round = 0
        job.retries_this_block = 0
        return tokens

    def _choose(self, job: Job, active: list[Row]) -> Row:
        """The row whose canvas the request keeps: the first that passed the checker, else the one it flags least
        (the first among equals)."""
        if len(active) == 1:
            return active[0]
        passed = [r for r in active if r.passed]
        if passed:
            return passed[0]
        host = np.stack([np.asarray(self.ops.to_numpy(r.argmax), dtype=np.int64).reshape(-1) for r in active])
        flags = self._violations(active, list(range(len(active))), host).sum(axis=1)
        return active[int(np.argmin(flags))]

    def _maybe_retry(self, job: Job, pick: Row, tokens: np.ndarray) -> bool:
        req = job.request
        if req.checker is None or job.retry_round >= req.max_retries:
            return False
        bad = self._violations([pick], [0], tokens[None])[0]
        if not bad.any():
            return False
        job.retry_round += 1
        job.retries += 1
        job.retries_this_block += 1
        self._start_canvas(job, [pick], start=(bad, tokens))
        return True

    def _repair(self, row: Row, tokens: np.ndarray):
        """Structured output: make the stopped canvas a valid continuation, left to right (masked choices among the
        last pass's top tokens; a position none of them fits takes the lowest allowed id)."""
        constraint = row.job.request.constraint
        cands = getattr(row, "candidates", None)
        cand = (np.asarray(self.ops.to_numpy(cands), dtype=np.int64) if cands is not None
                else tokens[:, None])
        fixed, fallback = constraint.repair(tokens, cand)
        while fallback:
            pos, allowed = fallback[0]
            fixed = fixed.copy()
            fixed[pos] = int(np.flatnonzero(allowed)[0])
            cand = cand.copy()
            cand[pos, 0] = fixed[pos]
            fixed, fallback = constraint.repair(fixed, cand)
        done = constraint.commit(fixed)
        return fixed, bool(done)

    def _commit(self, commits: list) -> None:
        """Commit finished canvases through the encoder, one call per contiguous run of rows, then start the next
        canvases."""
        if not commits:
            return
        slot = {id(r): i for i, r in enumerate(self.rows)}
        todo = sorted(((slot[id(r)], tokens) for job, tokens in commits for r in job.active_rows()),
                      key=lambda x: x[0])
        a = 0
        while a < len(todo):
            b = a + 1
            while b < len(todo) and todo[b][0] == todo[b - 1][0] + 1:
                b += 1
            canvas = np.stack([t for _, t in todo[a:b]])
            self.backend.commit(self.cache, canvas, rows=slice(todo[a][0], todo[b - 1][0] + 1))
            self.counters["commits"] += 1
            a = b
        for job, _ in commits:
            job.block += 1
            self._start_canvas(job, job.active_rows())

    def _done(self, job: Job) -> None:
        result = self._result(job)
        job.handle.result = result
        self.jobs.pop(job.handle.id, None)
        self.counters["completed"] += 1
        self.events.append(DoneEvent(job.handle, result))

    def _result(self, job: Job) -> RequestResult:
        main = next((r for r in job.rows if not r.retired), job.rows[0])
        result = self._row_result(job, main)
        if job.request.views is not None:
            result.views = [self._row_result(job, r) for r in job.rows]
        return result

    def _row_result(self, job: Job, row: Row) -> RequestResult:
        s = job.settings
        raw = row.raw
        visible = visible_tokens(raw, s.eos_token_ids, s.pad_token_id)
        hit_eos = any(t in set(s.eos_token_ids) for t in raw) or (job.request.constraint is not None
                                                                  and job.request.constraint.accepted())
        non_pad = sum(1 for t in raw if t != s.pad_token_id) if s.pad_token_id is not None else len(raw)
        return RequestResult(
            token_ids=visible[: s.max_new_tokens], raw_token_ids=list(raw),
            finish_reason="eos" if hit_eos and len(visible) <= s.max_new_tokens else "length",
            prompt_tokens=len(job.prompts[row.index]), cached_tokens=job.cached_tokens, decoder_passes=row.passes,
            steps_per_canvas=list(row.steps_per_canvas),
            tokens_per_forward=non_pad / row.passes if row.passes else 0.0, retries=job.retries,
            attempts=job.request.width, seconds=time.perf_counter() - job.started, chosen=all(row.chosen))

    def _fail(self, job: Job, error: Exception) -> None:
        job.finished = True
        job.handle.error = error
        self.jobs.pop(job.handle.id, None)
        self.counters["failed"] += 1
        self.events.append(FailedEvent(job.handle, error))
        if job.rows:
            self._keep([r for r in self.rows if r.job is not job])
