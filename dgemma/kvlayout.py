"""Where each row's keys and values sit in a backend's batch cache, and which of them a query may attend to.

Written once, in numpy, for every backend: a backend keeps per-layer buffers and asks this module for write slots and
attention masks; it never works out a window or a padding rule itself.

Layout. Row r has consumed `length[r]` positions (left pads of a padded prefill included, as the reference counts
them). Full-attention layers keep every position: slot s holds position s. Sliding layers keep only what a later
query can still see, the last `window - 1` positions (the reference's cache keeps the same), left-aligned: slot j
holds position `length[r] - kept[r] + j`, with `kept[r] = min(length[r], window - 1)`. New tokens (a prompt chunk, a
committed canvas or a canvas being denoised) are written right after a row's kept slots, so a pass reads the cache in
place and no pass concatenates it. `valid[r, p]` is False for pad positions.

A mask is None when every row has the same layout and no pad is visible: the backend then calls attention without one
(what the reference does for an unpadded batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RowLayout:
    """The host-side bookkeeping of a batch cache: per-row lengths and the pad mask over positions."""

    window: int                 # sliding window of the model (sliding layers keep window - 1 positions)
    length: np.ndarray          # int64 [rows]
    valid: np.ndarray           # bool [rows, capacity]: valid[r, p] for positions p < length[r]

    @classmethod
    def empty(cls, window: int) -> "RowLayout":
        return cls(window, np.zeros(0, np.int64), np.zeros((0, 0), bool))

    @property
    def rows(self) -> int:
        return int(self.length.shape[0])

    def kept(self) -> np.ndarray:
        """Positions each row's sliding layers hold."""
        return np.minimum(self.length, self.window - 1)

    def uniform(self, rows: slice) -> bool:
        """Whether rows `rows` share one length and hold no pad (then no mask is needed)."""
        n = self.length[rows]
        if n.size == 0 or (n != n[0]).any():
            return False
        return bool(self.valid[rows, : int(n[0])].all())

    # -- rows joining and leaving ------------------------------------------------------------------------------------
    def ensure_positions(self, needed: int) -> None:
        if needed > self.valid.shape[1]:
            cap = max(needed, 2 * self.valid.shape[1], 64)
            grown = np.zeros((self.rows, cap), bool)
            grown[:, : self.valid.shape[1]] = self.valid
            self.valid = grown

    def append_rows(self, count: int) -> None:
        self.length = np.concatenate([self.length, np.zeros(count, np.int64)])
        self.valid = np.concatenate([self.valid, np.zeros((count, self.valid.shape[1]), bool)])

    def take(self, order: np.ndarray) -> None:
        self.length = self.length[order]
        self.valid = self.valid[order]

    def advance(self, rows: slice, new_valid: np.ndarray) -> None:
        """Rows `rows` consumed new positions [length, length + T) with pad mask `new_valid` [k, T]."""
        T = new_valid.shape[1]
        self.ensure_positions(int(self.length[rows].max()) + T)
        for j, r in enumerate(range(*rows.indices(self.rows))):
            n = int(self.length[r])
            self.valid[r, n:n + T] = new_valid[j]
        self.length[rows] += T


@dataclass
class DecodeLayout:
    """One denoising pass over rows [a, b): where the canvas goes and what it may see (bidirectional)."""

    full_write: np.ndarray      # int64 [k]: first slot of each row's canvas in the full layers (= its length)
    sliding_write: np.ndarray   # int64 [k]: the same in the sliding layers (= kept)
    full_span: int              # slots the full layers attend over (max length + C)
    sliding_span: int
    full_mask: np.ndarray | None     # bool [k, full_span]
    sliding_mask: np.ndarray | None  # bool [k, sliding_span]

    @property
    def same_slots(self) -> bool:
        return bool((self.full_write == self.full_write[0]).all())


def decode_layout(layout: RowLayout, rows: slice, canvas: int) -> DecodeLayout:
    n = layout.length[rows]
    kept = layout.kept()[rows]
    full_span, sliding_span = int(n.max()) + canvas, int(kept.max()) + canvas
    if layout.uniform(rows):
        return DecodeLayout(n.copy(), kept.copy(), full_span, sliding_span, None, None)
    k = n.shape[0]
    valid = layout.valid[rows]
    slots = np.arange(full_span)
    full = np.zeros((k, full_span), bool)
    sliding = np.zeros((k, sliding_span), bool)
    for j in range(k):
        nj, kj = int(n[j]), int(kept[j])
        full[j, :nj] = valid[j, :nj]
        full[j, nj:nj + canvas] = True
        sliding[j, :kj] = valid[j, nj - kj:nj]
        sliding[j, kj:kj + canvas] = True
    del slots
    return DecodeLayout(n.copy(), kept.copy(), full_span, sliding_span, full, sliding)


@dataclass
class ExtendLayout:
    """One causal encoder pass that appends T positions to rows [a, b) (a prompt chunk or a committed canvas)."""

    full_write: np.ndarray      # int64 [k]
    sliding_write: np.ndarray   # int64 [k]
    full_mask: np.ndarray       # bool [k, T, full_span]
    sliding_mask: np.ndarray    # bool [k, T, sliding_span]
    sliding_keep_from: np.ndarray  # int64 [k]: after the pass, the sliding slots kept start here (a left shift)
    sliding_kept_after: int | np.ndarray

    @property
    def same_slots(self) -> bool:
        return bool((self.full_write == self.full_write[0]).all())


def extend_layout(layout: RowLayout, rows: slice, new_valid: np.ndarray,
                  image_blocks: np.ndarray | None = None) -> ExtendLayout:
    """Masks for queries at positions length[r] + t over the row's kept keys and the new ones, causal, windowed in
    sliding layers, pads hidden; a pad query attends to itself so that no mask row is empty (an empty row is NaN).
    `image_blocks` [k, T] (0 for text, b > 0 for the tokens of image b) lets the tokens of one image see each other
    both ways, as the reference's `mm_token_type_ids` does; an image never spans two passes."""
    W = layout.window
    n = layout.length[rows]
    kept = layout.kept()[rows]
    k, T = new_valid.shape
    full_span, sliding_span = int(n.max()) + T, int(kept.max()) + T
    full = np.zeros((k, T, full_span), bool)
    sliding = np.zeros((k, T, sliding_span), bool)
    valid = layout.valid[rows]
    for j in range(k):
        nj, kj = int(n[j]), int(kept[j])
        qpos = nj + np.arange(T)
        key_valid = np.concatenate([valid[j, :nj], new_valid[j]])        # positions 0 .. nj + T - 1
        kpos = np.arange(nj + T)
        allowed = (kpos[None, :] <= qpos[:, None]) & key_valid[None, :]
        allowed |= kpos[None, :] == qpos[:, None]
        both_ways = None
        if image_blocks is not None:
            b = image_blocks[j]
            both_ways = (b[:, None] == b[None, :]) & (b[:, None] > 0)      # [T, T] among the new tokens
            allowed[:, nj:] |= both_ways
        full[j, :, : nj + T] = allowed
        spos = np.concatenate([np.arange(nj - kj, nj), qpos])             # positions of sliding slots
        s_allowed = (spos[None, :] <= qpos[:, None]) & (qpos[:, None] - spos[None, :] < W)
        s_allowed &= key_valid[spos][None, :]
        s_allowed |= spos[None, :] == qpos[:, None]
        if both_ways is not None:
            s_allowed[:, kj:] |= both_ways
        sliding[j, :, : kj + T] = s_allowed
    after = np.minimum(n + T, W - 1)
    keep_from = kept + T - after
    return ExtendLayout(n.copy(), kept.copy(), full, sliding, keep_from, after)


# == shape buckets: the sizes a compiled pass is traced at ============================================================
def span_bucket(n: int, floor: int = 64) -> int:
    """n rounded up to a multiple of `floor`, or of an eighth of the power of two below it: eight sizes per octave,
    less than max(floor, n / 8) more than n (the shapes a decoder pass is traced at as the cache grows). Coarser
    buckets retrace less but read more: with four per octave a canvas-256 fast pass on mlx[cpu] ran ~15% slower than
    the uncompiled one (up to a quarter more keys, masked); a retrace costs about one pass."""
    step = max(floor, 1 << max(0, n.bit_length() - 4))
    return -(-n // step) * step


def width_bucket(width: int, canvas: int) -> int:
    """A fast pass's forwarded width rounded up to a bucket (multiples of 8 up to 128, then eight per octave)."""
    return min(canvas, span_bucket(width, 8))
