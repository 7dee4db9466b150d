"""Block-autoregressive scheduling: prefill, then canvas after canvas of denoising, each committed to the cache.

Batches hold prompts of different lengths, left-padded with an attention mask. Every row carries its own noise source
(its own seed), so a request gives the same tokens alone or in any batch. Per denoising step only a [B] "done" vector
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


def run_blocks(backend: Backend, prompts: Sequence[Sequence[int]], settings: SamplerSettings,
               noises: Sequence[RowNoise],
               on_step: Callable[[int, int, object, object], None] | None = None,
               run: BatchRun | None = None) -> Iterator[CanvasEvent]:
    """Generate canvases for a batch of token-id prompts, yielding each finished canvas.

    on_step(block, step, argmax_canvas, accepted_mask) is called after every denoising pass with device arrays
    (for live views); it is the caller's choice to copy them to the host.
    """
    cfg = backend.config
    ops = backend.ops
    C, V, N = cfg.canvas_length, cfg.vocab_size, settings.max_denoising_steps
    check_prompts(prompts, V, cfg.max_position_embeddings, settings.max_new_tokens, C)
    if len(noises) != len(prompts):
        raise ValueError("one noise source per prompt is needed")
    pad_id = settings.pad_token_id if settings.pad_token_id is not None else 0
    ids, mask = left_pad(prompts, pad_id)
    B = len(prompts)
    run = run if run is not None else BatchRun([len(p) for p in prompts])
    run.decoder_passes = passes = np.zeros(B, dtype=np.int64)
    max_length = ids.shape[1] + settings.max_new_tokens
    eos = np.asarray(settings.eos_token_ids, dtype=np.int64)

    state = backend.prefill(ids, mask)
    seq_done = np.zeros(B, dtype=bool)
    to_commit = None
    cur_len = ids.shape[1]
    for block in range(math.ceil(settings.max_new_tokens / C)):
        if to_commit is not None:
            backend.commit(state, to_commit)
        done = seq_done.copy()  # rows that stopped denoising this canvas
        zeros_i = np.zeros(C, dtype=np.int64)
        zeros_f = np.zeros(C, dtype=np.float32)

        def draw(fn, *args, zeros):
            return ops.stack_rows([fn(noises[r], *args) if not done[r] else ops.from_numpy(zeros) for r in range(B)])

        canvas = draw(lambda nz: nz.tokens(block, 0, C, V), zeros=zeros_i)
        argmax = canvas
        probs = None
        stopper = StableAndConfident(ops, settings.stability_threshold, settings.confidence_threshold)
        steps = np.zeros(B, dtype=np.int64)
        for it in range(1, N + 1):
            live = ~done
            passes += live
            steps += live
            logits = backend.denoise(state, canvas, self_conditioning_probs=probs)
            uniforms = draw(lambda nz: nz.uniforms(block, it, C), zeros=zeros_f)
            renoise = draw(lambda nz: nz.tokens(block, it, C, V), zeros=zeros_i)
            res = denoise_step(ops, logits, canvas, steps_remaining=N - it + 1, max_steps=N,
                               t_min=settings.t_min, t_max=settings.t_max, entropy_bound=settings.entropy_bound,
                               uniforms=uniforms, renoise_tokens=renoise, owns_logits=True)
            if done.any():  # rows that already stopped keep the canvas they stopped on
                frozen = ops.from_numpy(done[:, None])
                argmax = ops.where(frozen, argmax, res.argmax)
            else:
                argmax = res.argmax
            canvas, probs = res.canvas, res.probs
            stop = ops.to_numpy(stopper(argmax, res.mean_entropy)).astype(bool)
            if on_step is not None:
                on_step(block, it, argmax, res.accepted)
            done |= stop
            if done.all():
                break

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
                            [bool(x) for x in (seq_done | newly)], [bool(x) for x in (hit_eos & ~seq_done)])
        seq_done |= newly
        run.canvases.append(event)
        yield event
        if seq_done.all():
            break
        to_commit = tokens
