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
task (for Sudoku: a digit repeated in its row, column or box, or a given overwritten)."""


def run_blocks(backend: Backend, prompts: Sequence[Sequence[int]], settings: SamplerSettings,
               noises: Sequence[RowNoise],
               on_step: Callable[[int, int, object, object], None] | None = None,
               run: BatchRun | None = None, checker: ConstraintChecker | None = None,
               max_retries: int = 0) -> Iterator[CanvasEvent]:
    """Generate canvases for a batch of token-id prompts, yielding each finished canvas.

    on_step(block, step, argmax_canvas, accepted_mask) is called after every denoising pass with device arrays
    (for live views); it is the caller's choice to copy them to the host.

    Constraint-aware sampling: with a `checker`, accepted tokens that break a constraint are re-noised like
    low-confidence ones (this costs one small host copy of the [B, C] token canvas per step), and a finished canvas
    that still breaks one is denoised again from itself with its offending positions re-noised, up to `max_retries`
    times per canvas.
    """
    cfg = backend.config
    ops = backend.ops
    C, V, N = cfg.canvas_length, cfg.vocab_size, settings.max_denoising_steps
    check_prompts(prompts, V, cfg.max_position_embeddings, settings.max_new_tokens, C)
    if len(noises) != len(prompts):
        raise ValueError("one noise source per prompt is needed")
    if max_retries < 0:
        raise InputError(f"max_retries must be >= 0 (got {max_retries})")
    pad_id = settings.pad_token_id if settings.pad_token_id is not None else 0
    ids, mask = left_pad(prompts, pad_id)
    B = len(prompts)
    run = run if run is not None else BatchRun([len(p) for p in prompts])
    run.decoder_passes = passes = np.zeros(B, dtype=np.int64)
    max_length = ids.shape[1] + settings.max_new_tokens
    eos = np.asarray(settings.eos_token_ids, dtype=np.int64)
    zeros_i = np.zeros(C, dtype=np.int64)
    zeros_f = np.zeros(C, dtype=np.float32)

    def violations(tokens: np.ndarray, rows) -> np.ndarray:
        out = np.zeros(tokens.shape, dtype=bool)
        for r in rows:
            out[r] = np.asarray(checker(int(r), tokens[r]), dtype=bool)
        return out

    def denoise_canvas(block: int, done: np.ndarray, steps: np.ndarray, start=None, attempt: int = 0):
        """One canvas's denoising loop for the rows not `done`; returns the argmax canvas (device array).
        Retries draw their noise under step keys of their own, so no draw repeats."""
        base = attempt * (N + 1)

        def draw(fn, *args, zeros):
            return ops.stack_rows([fn(noises[r], *args) if not done[r] else ops.from_numpy(zeros) for r in range(B)])

        canvas = draw(lambda nz: nz.tokens(block, base, C, V), zeros=zeros_i)
        if start is not None:  # a retry: keep the finished canvas except where it breaks a constraint
            canvas = ops.where(ops.from_numpy(start[1]), canvas, ops.from_numpy(start[0]))
        argmax = canvas
        probs = None
        stopper = StableAndConfident(ops, settings.stability_threshold, settings.confidence_threshold)
        for it in range(1, N + 1):
            live = ~done
            passes[:] += live
            steps[:] += live
            logits = backend.denoise(state, canvas, self_conditioning_probs=probs)
            uniforms = draw(lambda nz: nz.uniforms(block, base + it, C), zeros=zeros_f)
            renoise = draw(lambda nz: nz.tokens(block, base + it, C, V), zeros=zeros_i)
            res = denoise_step(ops, logits, canvas, steps_remaining=N - it + 1, max_steps=N,
                               t_min=settings.t_min, t_max=settings.t_max, entropy_bound=settings.entropy_bound,
                               uniforms=uniforms, renoise_tokens=renoise, owns_logits=True)
            if done.any():  # rows that already stopped keep the canvas they stopped on
                frozen = ops.from_numpy(done[:, None])
                argmax = ops.where(frozen, argmax, res.argmax)
            else:
                argmax = res.argmax
            canvas, probs = res.canvas, res.probs
            if checker is not None:
                bad = violations(ops.to_numpy(canvas), np.flatnonzero(live)) & ops.to_numpy(res.accepted)
                if bad.any():
                    canvas = ops.where(ops.from_numpy(bad), renoise, canvas)
            stop = ops.to_numpy(stopper(argmax, res.mean_entropy)).astype(bool)
            if on_step is not None:
                on_step(block, it, argmax, res.accepted)
            done |= stop
            if done.all():
                break
        return argmax

    state = backend.prefill(ids, mask)
    seq_done = np.zeros(B, dtype=bool)
    to_commit = None
    cur_len = ids.shape[1]
    for block in range(math.ceil(settings.max_new_tokens / C)):
        if to_commit is not None:
            backend.commit(state, to_commit)
        steps = np.zeros(B, dtype=np.int64)
        argmax = denoise_canvas(block, seq_done.copy(), steps)
        retries = np.zeros(B, dtype=np.int64)
        if checker is not None:
            for attempt in range(1, max_retries + 1):
                host = np.array(ops.to_numpy(argmax), dtype=np.int64)
                bad = violations(host, np.flatnonzero(~seq_done))
                again = bad.any(axis=1) & ~seq_done
                if not again.any():
                    break
                retries += again
                redo = denoise_canvas(block, ~again, steps, start=(host, bad), attempt=attempt)
                argmax = ops.where(ops.from_numpy(again[:, None]), redo, argmax)

        tokens = np.array(ops.to_numpy(argmax), dtype=np.int64, copy=True)
        cur_len += C
        hit_eos = np.isin(tokens, eos).any(axis=1) if eos.size else np.zeros(B, dtype=bool)
        newly = (hit_eos | (cur_len >= max_length)) & ~seq_done
        if settings.pad_token_id is not None:
            tokens[seq_done] = settings.pad_token_id
            for r in np.flatnonzero(hit_eos & ~seq_done):
                first = int(np.flatnonzero(np.isin(tokens[r], eos))[0])
                tokens[r, first + 1:] = settings.pad_token_id
        event = CanvasEvent(block, tokens, [int(s) for s in np.where(seq_done, 0, steps)],
                            [bool(x) for x in (seq_done | newly)], [bool(x) for x in (hit_eos & ~seq_done)],
                            [int(x) for x in retries])
        seq_done |= newly
        run.canvases.append(event)
        yield event
        if seq_done.all():
            break
        to_commit = tokens
