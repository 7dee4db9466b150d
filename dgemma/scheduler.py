"""Block-autoregressive scheduling: prefill, then canvas after canvas of denoising, each committed to the cache.

Batches hold prompts of different lengths, left-padded with an attention mask. Every row carries its own noise source
(its own seed), so a request draws the same random numbers alone or in any batch; its logits then differ from a solo
run only by the rounding of batched matmuls (which a random model's self-conditioning can amplify over many steps).
Per denoising step only a [B] "done" vector
crosses to the host; the finished canvas [B, C] crosses once per block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .backend import Backend, RowNoise
from .config import SamplerSettings
from .errors import InputError
from .sampler import StableAndConfident, denoise_step


@dataclass
class CanvasEvent:
    """One finished canvas of a batch."""

    block: int
    tokens: np.ndarray            # [B, C] committed tokens; after an eos (and for finished rows) they are pad
    steps: list[int]              # denoising passes each row spent on this canvas (0 if it had already finished)
    finished: list[bool]          # rows that have met eos or the length limit
    hit_eos: list[bool]           # rows that met eos in this canvas
    retries: list[int] = field(default_factory=list)  # re-denoising rounds spent on constraint violations
    chosen: list[bool] = field(default_factory=list)   # rows whose canvas their group kept (all, without groups)


@dataclass
class BatchRun:
    prompt_lengths: list[int]
    canvases: list[CanvasEvent] = field(default_factory=list)
    decoder_passes: np.ndarray | None = None

    def raw_tokens(self, row: int) -> list[int]:
        """All generated tokens of a row, canvas by canvas, with pads where the reference puts them."""
        return [int(t) for ev in self.canvases for t in ev.tokens[row]]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=bool)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = True
    return ids, mask


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, max_positions: int, max_new_tokens: int,
                  canvas_length: int) -> None:
    if not prompts:
        raise InputError("no prompt given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise InputError(f"prompt {i} is empty")
        bad = [t for t in p if not (0 <= int(t) < vocab_size)]
        if bad:
            raise InputError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
    longest = max(len(p) for p in prompts)
    needed = longest + math.ceil(max_new_tokens / canvas_length) * canvas_length
    if needed > max_positions:
        raise InputError(
            f"prompt of {longest} tokens plus {max_new_tokens} new tokens (rounded up to whole canvases of "
            f"{canvas_length}) needs {needed} positions; the model has {max_positions}"
        )


ConstraintChecker = Callable[[int, np.ndarray], np.ndarray]
"""checker(row, canvas_tokens [C]) -> bool [C]: the positions whose token breaks a known constraint of that row's
task (for Sudoku: a digit repeated in its row, column or box, or a given overwritten). A checker may also have
`many(rows [n], canvas_tokens [n, C]) -> bool [n, C]`, which the scheduler then calls once per step instead of once
per row."""


def attempt_seed(seed: int, attempt: int) -> int:
    """The seed of parallel attempt `attempt` at a request seeded `seed` (attempt 0 is the request's own draw, so
    attempts=1 generates exactly what a plain call does)."""
    return (int(seed) + attempt * 0x9E3779B97F4A7C15) % (1 << 63)


def run_blocks(backend: Backend, prompts: Sequence[Sequence[int]], settings: SamplerSettings,
               noises: Sequence[RowNoise],
               on_step: Callable[[int, int, object, object], None] | None = None,
               run: BatchRun | None = None, checker: ConstraintChecker | None = None,
               max_retries: int = 0, groups: Sequence[int] | None = None,
               stop_when_valid: bool = False, renoise: bool = True) -> Iterator[CanvasEvent]:
    """Generate canvases for a batch of token-id prompts, yielding each finished canvas.

    on_step(block, step, argmax_canvas, accepted_mask) is called after every denoising pass with device arrays
    (for live views); it is the caller's choice to copy them to the host.

    Constraint-aware sampling: with a `checker`, accepted tokens that break a constraint are re-noised like
    low-confidence ones (this costs one small host copy of the [B, C] token canvas per step), and a finished canvas
    that still breaks one is denoised again from itself with its offending positions re-noised, up to `max_retries`
    times per canvas.

    With `renoise=False` the checker does not touch the canvas during denoising; it only judges finished canvases
    (retries, attempts, stop_when_valid).

    `stop_when_valid` says the checker is a complete verifier (a canvas with no flagged position is a right answer,
    as for Sudoku's strict checker): a row then stops as soon as its argmax canvas passes, without waiting for the
    stable-and-confident rule (one host copy of the argmax canvas per step).

    Parallel attempts: rows with the same `groups` id are attempts at one request, each with its own noise. The
    first attempt whose canvas passes the checker ends its whole group; if none passes, the attempt with the fewest
    flagged positions is chosen (and only it is retried); every row of the group is charged the group's passes. When
    the attempts share one prompt, every row then carries the chosen canvas, so the group commits and continues as one
    request. Attempts may also be different encodings of one request (Sudoku's symmetric views of a puzzle): then the
    other rows finish with that canvas and the chosen row goes on alone (`CanvasEvent.chosen` says which). Needs a
    checker.
    """
    cfg = backend.config
    ops = backend.ops
    C, V, N = cfg.canvas_length, cfg.vocab_size, settings.max_denoising_steps
    check_prompts(prompts, V, cfg.max_position_embeddings, settings.max_new_tokens, C)
    if len(noises) != len(prompts):
        raise ValueError("one noise source per prompt is needed")
    if max_retries < 0:
        raise InputError(f"max_retries must be >= 0 (got {max_retries})")
    if (groups is not None or stop_when_valid) and checker is None:
        raise InputError("parallel attempts and stop_when_valid need a checker to tell a right canvas")
    if groups is not None and len(groups) != len(prompts):
        raise InputError(f"{len(groups)} group ids for {len(prompts)} prompts")
    group_of = (np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1) if groups is not None
                else np.arange(len(prompts)))
    shared_prompt = {}  # group -> whether all its attempts have the same prompt
    if groups is not None:
        for g in np.unique(group_of):
            members = [list(prompts[r]) for r in np.flatnonzero(group_of == g)]
            shared_prompt[int(g)] = all(m == members[0] for m in members[1:])
    pad_id = settings.pad_token_id if settings.pad_token_id is not None else 0
    ids, mask = left_pad(prompts, pad_id)
    B = len(prompts)
    run = run if run is not None else BatchRun([len(p) for p in prompts])
    run.decoder_passes = passes = np.zeros(B, dtype=np.int64)
    max_length = ids.shape[1] + settings.max_new_tokens
    eos = np.asarray(settings.eos_token_ids, dtype=np.int64)
    zeros_i = np.zeros(C, dtype=np.int64)
    zeros_f = np.zeros(C, dtype=np.float32)

    def violations(tokens: np.ndarray, which, row_ids=None) -> np.ndarray:
        """Flags [n, C] for canvases `tokens` [n, C]: those at positions `which` checked, as batch rows
        row_ids[which] (row_ids: which batch row each line of `tokens` is; default the identity)."""
        out = np.zeros(tokens.shape, dtype=bool)
        which = np.asarray(which, dtype=np.int64)
        batch_rows = which if row_ids is None else np.asarray(row_ids)[which]
        many = getattr(checker, "many", None)  # a checker may check many rows in one call
        if many is not None and which.size:
            out[which] = np.asarray(many(batch_rows, tokens[which]), dtype=bool)
            return out
        for w, r in zip(which, batch_rows):
            out[w] = np.asarray(checker(int(r), tokens[w]), dtype=bool)
        return out

    # Rows that stop leave the batch (their cache rows are dropped from a copy of the state for this canvas), so a
    # batch whose rows finish at different steps stops paying for them. Not with on_step, whose callers index the
    # whole batch. Each row draws its own noise, so its tokens depend on the batch it sits in only through the
    # rounding of batched matmuls, as for any batch.
    compact = (on_step is None and hasattr(ops, "take_rows")
               and type(backend).select_rows is not Backend.select_rows)

    def denoise_canvas(block: int, done: np.ndarray, steps: np.ndarray, start=None, attempt: int = 0):
        """One canvas's denoising loop for the rows not `done`; returns the argmax canvas [B, C] (device array) and,
        with a checker, which rows stopped on a canvas that passes it. Retries draw their noise under step keys of
        their own, so no draw repeats."""
        base = attempt * (N + 1)
        passed = np.zeros(B, dtype=bool)
        rows = np.flatnonzero(~done) if compact else np.arange(B)  # the batch rows this loop runs, in order
        sub_state = state if len(rows) == B else backend.select_rows(state, rows)
        final = np.zeros((B, C), dtype=np.int64) if compact else None  # argmax of rows that left the batch

        def draw(fn, *args, zeros):
            return ops.stack_rows([fn(noises[r], *args) if not done[r] else ops.from_numpy(zeros) for r in rows])

        canvas = draw(lambda nz: nz.tokens(block, base, C, V), zeros=zeros_i)
        if start is not None:  # a retry: keep the finished canvas except where it breaks a constraint
            canvas = ops.where(ops.from_numpy(start[1][rows]), canvas, ops.from_numpy(start[0][rows]))
        argmax = canvas
        probs = None
        stopper = StableAndConfident(ops, settings.stability_threshold, settings.confidence_threshold)
        for it in range(1, N + 1):
            live = ~done[rows]
            passes[rows] += live
            steps[rows] += live
            logits = backend.denoise(sub_state, canvas, self_conditioning_probs=probs)
            uniforms = draw(lambda nz: nz.uniforms(block, base + it, C), zeros=zeros_f)
            fresh = draw(lambda nz: nz.tokens(block, base + it, C, V), zeros=zeros_i)
            res = denoise_step(ops, logits, canvas, steps_remaining=N - it + 1, max_steps=N,
                               t_min=settings.t_min, t_max=settings.t_max, entropy_bound=settings.entropy_bound,
                               uniforms=uniforms, renoise_tokens=fresh, owns_logits=True)
            if not live.all():  # rows that already stopped keep the canvas they stopped on
                argmax = ops.where(ops.from_numpy(~live[:, None]), argmax, res.argmax)
            else:
                argmax = res.argmax
            canvas, probs = res.canvas, res.probs
            if checker is not None and renoise:
                bad = violations(np.asarray(ops.to_numpy(canvas)), np.flatnonzero(live), rows)
                bad &= np.asarray(ops.to_numpy(res.accepted))
                if bad.any():
                    canvas = ops.where(ops.from_numpy(bad), fresh, canvas)
            stop = ops.to_numpy(stopper(argmax, res.mean_entropy)).astype(bool) & live
            if on_step is not None:
                on_step(block, it, argmax, res.accepted)
            host_argmax = None  # this pass's argmax canvas on the host, copied at most once
            if checker is not None and (stop_when_valid or groups is not None):
                # Which rows' argmax canvas passes the checker: all live rows when a pass ends a row, else only the
                # rows that stop now (a group needs to know whether its stopping attempt is right).
                which = np.flatnonzero(live if stop_when_valid else stop)
                if which.size:
                    host_argmax = np.asarray(ops.to_numpy(argmax))
                    ok = np.zeros(len(rows), dtype=bool)
                    ok[which] = ~violations(host_argmax, which, rows)[which].any(axis=1)
                    if stop_when_valid:
                        stop |= ok
                    passed[rows[ok & stop]] = True
            if groups is not None and passed.any():  # a right attempt ends its group
                stop |= np.isin(group_of[rows], group_of[passed]) & live
            done[rows[stop]] = True
            if final is not None and stop.any():
                if host_argmax is None:
                    host_argmax = np.asarray(ops.to_numpy(argmax))
                final[rows[stop]] = host_argmax[stop]
            if done[rows].all():
                break
            gone = done[rows]
            if compact and gone.sum() >= max(1, len(rows) // 8):
                keep = np.flatnonzero(~gone)
                canvas, argmax = ops.take_rows(canvas, keep), ops.take_rows(argmax, keep)
                probs = ops.take_rows(probs, keep)
                stopper.take_rows(lambda x: ops.take_rows(x, keep))
                rows = rows[keep]
                sub_state = backend.select_rows(state, rows)
        if final is None:
            return argmax, passed
        final[rows] = np.asarray(ops.to_numpy(argmax))
        return ops.from_numpy(final), passed

    def choose_attempts(host: np.ndarray, passed: np.ndarray, seq_done: np.ndarray) -> np.ndarray:
        """One row per live group: its first attempt that passed the checker, else the one with the fewest flagged
        positions (the lowest row among equals)."""
        chosen = np.zeros(B, dtype=bool)
        flagged = None
        for g in np.unique(group_of[~seq_done]):
            members = np.flatnonzero(group_of == g)
            if passed[members].any():
                chosen[members[passed[members]][0]] = True
                continue
            if flagged is None:
                flagged = violations(host, np.flatnonzero(~seq_done)).sum(axis=1)
            chosen[members[int(np.argmin(flagged[members]))]] = True
        return chosen

    state = backend.prefill(ids, mask)
    seq_done = np.zeros(B, dtype=bool)
    to_commit = None
    cur_len = ids.shape[1]
    for block in range(math.ceil(settings.max_new_tokens / C)):
        if to_commit is not None:
            backend.commit(state, to_commit)
        steps = np.zeros(B, dtype=np.int64)
        argmax, passed = denoise_canvas(block, seq_done.copy(), steps)
        retries = np.zeros(B, dtype=np.int64)
        chosen = ~seq_done  # the rows whose canvas their group keeps (every live row without groups)
        if groups is not None:
            chosen = choose_attempts(np.array(ops.to_numpy(argmax), dtype=np.int64), passed, seq_done)
        if checker is not None:
            for attempt in range(1, max_retries + 1):
                host = np.array(ops.to_numpy(argmax), dtype=np.int64)
                bad = violations(host, np.flatnonzero(chosen & ~seq_done))
                again = bad.any(axis=1) & chosen & ~seq_done
                if not again.any():
                    break
                retries += again
                redo, _ = denoise_canvas(block, ~again, steps, start=(host, bad), attempt=attempt)
                argmax = ops.where(ops.from_numpy(again[:, None]), redo, argmax)

        tokens = np.array(ops.to_numpy(argmax), dtype=np.int64, copy=True)
        retired = np.zeros(B, dtype=bool)  # attempts that end here because their group goes on with another row
        if groups is not None:
            for g in np.unique(group_of[~seq_done]):
                members = np.flatnonzero(group_of == g)
                pick = members[chosen[members]][0]
                steps[members] = steps[members].max()
                if shared_prompt[int(g)]:  # every attempt carries the chosen canvas (and its retries) on
                    tokens[members] = tokens[pick]
                    retries[members] = retries[pick]
                    chosen[members] = True
                else:
                    retired[members] = members != pick
            for g in np.unique(group_of):
                members = np.flatnonzero(group_of == g)
                passes[members] = passes[members].max()
        cur_len += C
        hit_eos = np.isin(tokens, eos).any(axis=1) if eos.size else np.zeros(B, dtype=bool)
        newly = (hit_eos | (cur_len >= max_length) | retired) & ~seq_done
        if settings.pad_token_id is not None:
            tokens[seq_done] = settings.pad_token_id
            for r in np.flatnonzero(hit_eos & ~seq_done):
                first = int(np.flatnonzero(np.isin(tokens[r], eos))[0])
                tokens[r, first + 1:] = settings.pad_token_id
        event = CanvasEvent(block, tokens, [int(s) for s in np.where(seq_done, 0, steps)],
                            [bool(x) for x in (seq_done | newly)], [bool(x) for x in (hit_eos & ~seq_done)],
                            [int(x) for x in retries], [bool(x) for x in chosen & ~seq_done])
        seq_done |= newly
        run.canvases.append(event)
        yield event
        if seq_done.all():
            break
        to_commit = tokens
