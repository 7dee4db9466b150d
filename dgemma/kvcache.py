"""The batch KV cache every backend keeps, written once: preallocated per-layer buffers whose rows are requests.

Rows join (a prefill's rows are copied in) and leave (the kept rows are compacted) at canvas boundaries; inside a
pass the model writes only the new tokens' keys and values and attends over views of the buffers, so no pass copies
or concatenates the cache. Where each row's tokens sit and what a query may see is `dgemma.kvlayout`'s business;
a backend subclass supplies four array primitives (`_zeros`, `_set`, `_gather`, `_device_mask`) and nothing else.
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .kvlayout import DecodeLayout, ExtendLayout, RowLayout


class BatchKVCache:
    """Keys/values per layer, [row capacity, kv heads, slot capacity, head dim]. Full-attention layers grow their
    slot capacity by doubling as rows get longer; sliding layers hold window - 1 kept slots plus room for the widest
    pass (`pass_width`: a canvas or a prefill chunk), so they never grow."""

    def __init__(self, cfg: ModelConfig, pass_width: int):
        self.cfg = cfg
        self.layout = RowLayout.empty(cfg.sliding_window)
        self.pass_width = pass_width
        self.sliding = [spec.sliding for spec in cfg.layers]
        self.key_buffers, self.value_buffers = [], []
        for spec in cfg.layers:
            slots = cfg.sliding_window - 1 + pass_width if spec.sliding else 0
            shape = (0, spec.num_kv_heads, slots, spec.head_dim)
            self.key_buffers.append(self._zeros(shape))
            self.value_buffers.append(self._zeros(shape))

    # -- the backend's primitives ------------------------------------------------------------------------------------
    def _zeros(self, shape):
        raise NotImplementedError

    def _set(self, buf, index: tuple, value):
        """buf[index] = value; returns the buffer holding the result (the same object where the framework allows)."""
        raise NotImplementedError

    def _gather(self, buf, rows: np.ndarray):
        """buf[rows] along the first axis (a copy)."""
        raise NotImplementedError

    def _device_mask(self, mask: np.ndarray):
        raise NotImplementedError

    def _set_at(self, buf, rows: np.ndarray, slots: np.ndarray, value):
        """buf[rows[j], :, slots[j, a]] = value[j, :, a] for value [k, heads, A, dim]."""
        raise NotImplementedError

    def _snapshot(self, view):
        """A value that stays put while the buffer it views is written (a copy where views alias)."""
        return view

    # -- capacity and rows -----------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.layout.rows

    def _stores(self):
        return (self.key_buffers, self.value_buffers)

    def _grow(self, rows: int, full_slots: int) -> None:
        for i, sliding in enumerate(self.sliding):
            cap_rows, _, cap_slots, _ = self.key_buffers[i].shape
            want_rows = cap_rows if rows <= cap_rows else max(rows, 2 * cap_rows)
            want_slots = cap_slots if sliding or full_slots <= cap_slots else max(full_slots, 2 * cap_slots)
            if (want_rows, want_slots) == (cap_rows, cap_slots):
                continue
            for store in self._stores():
                old = store[i]
                new = self._zeros((want_rows, old.shape[1], want_slots, old.shape[3]))
                store[i] = self._set(new, (slice(0, cap_rows), slice(None), slice(0, cap_slots)), old)

    def reserve(self, extra_positions: int, rows: slice | None = None) -> None:
        """Room for `extra_positions` more tokens in rows `rows` (all by default)."""
        rows = slice(0, self.rows) if rows is None else rows
        longest = int(self.layout.length[rows].max()) if self.rows else 0
        self._grow(self.rows, longest + extra_positions)

    def add_rows(self, count: int) -> slice:
        """Append `count` empty rows; returns their slots."""
        start = self.rows
        self.layout.append_rows(count)
        self._grow(self.rows, 0)
        return slice(start, start + count)

    def take(self, order) -> None:
        """Keep rows `order` (host ints), in that order: row j becomes old row order[j]. A copy of the kept rows,
        made when rows leave or reorder (at canvas boundaries), never inside a pass."""
        order = np.asarray(order, dtype=np.int64)
        if len(order):
            for store in self._stores():
                for i, buf in enumerate(store):
                    store[i] = self._set(buf, (slice(0, len(order)),), self._gather(buf, order))
        self.layout.take(order)

    def copy_rows_from(self, other: "BatchKVCache", src: slice, dst: slice) -> None:
        """Rows `src` of another cache of this model become rows `dst` here (a joining prefill, a cached prefix)."""
        self.layout.ensure_positions(other.layout.valid.shape[1])
        n = int(other.layout.length[src].max()) if other.rows else 0
        self._grow(self.rows, n + self.pass_width)
        for store, theirs in zip(self._stores(), other._stores()):
            for i, buf in enumerate(store):
                width = theirs[i].shape[2] if self.sliding[i] else min(n, theirs[i].shape[2])
                store[i] = self._set(buf, (dst, slice(None), slice(0, width)), theirs[i][src, :, :width])
        self.layout.length[dst] = other.layout.length[src]
        self.layout.valid[dst] = False
        self.layout.valid[dst, : other.layout.valid.shape[1]] = other.layout.valid[src]

    # -- what the model calls inside a pass --------------------------------------------------------------------------
    def _write(self, i: int, rows: slice, starts: np.ndarray, k, v) -> None:
        T = k.shape[2]
        if (starts == starts[0]).all():
            s = int(starts[0])
            index = (rows, slice(None), slice(s, s + T))
            self.key_buffers[i] = self._set(self.key_buffers[i], index, k)
            self.value_buffers[i] = self._set(self.value_buffers[i], index, v)
            return
        for j, r in enumerate(range(*rows.indices(self.rows))):
            s = int(starts[j])
            index = (r, slice(None), slice(s, s + T))
            self.key_buffers[i] = self._set(self.key_buffers[i], index, k[j])
            self.value_buffers[i] = self._set(self.value_buffers[i], index, v[j])

    def decode_kv(self, i: int, rows: slice, lay: DecodeLayout, k, v, masks: dict):
        """Write the canvas's keys/values after each row's kept slots; return what the canvas attends to."""
        sliding = self.sliding[i]
        self._write(i, rows, lay.sliding_write if sliding else lay.full_write, k, v)
        if sliding not in masks:
            mask = lay.sliding_mask if sliding else lay.full_mask
            masks[sliding] = None if mask is None else self._device_mask(mask[:, None, None])
        span = lay.sliding_span if sliding else lay.full_span
        return self.key_buffers[i][rows, :, :span], self.value_buffers[i][rows, :, :span], masks[sliding]

    def decode_kv_at(self, i: int, rows: slice, lay: DecodeLayout, positions: np.ndarray, k, v, masks: dict):
        """Fast mode: write the keys/values of canvas positions `positions` [k, A] only; the other canvas slots keep
        what an earlier pass wrote there."""
        sliding = self.sliding[i]
        start = lay.sliding_write if sliding else lay.full_write
        row_ids = np.arange(*rows.indices(self.rows))
        slots = start[:, None] + positions
        self.key_buffers[i] = self._set_at(self.key_buffers[i], row_ids, slots, k)
        self.value_buffers[i] = self._set_at(self.value_buffers[i], row_ids, slots, v)
        if sliding not in masks:
            mask = lay.sliding_mask if sliding else lay.full_mask
            masks[sliding] = None if mask is None else self._device_mask(mask[:, None, None])
        span = lay.sliding_span if sliding else lay.full_span
        return self.key_buffers[i][rows, :, :span], self.value_buffers[i][rows, :, :span], masks[sliding]

    def extend_kv(self, i: int, rows: slice, lay: ExtendLayout, k, v, masks: dict):
        """Write new tokens' keys/values after each row's kept slots; return what the (causal) queries see."""
        sliding = self.sliding[i]
        self._write(i, rows, lay.sliding_write if sliding else lay.full_write, k, v)
        mask = lay.sliding_mask if sliding else lay.full_mask
        if sliding not in masks:
            masks[sliding] = self._device_mask(mask[:, None])
        span = mask.shape[2]
        return self.key_buffers[i][rows, :, :span], self.value_buffers[i][rows, :, :span], masks[sliding]

    def finish_extend(self, rows: slice, lay: ExtendLayout, new_valid: np.ndarray) -> None:
        """Drop the sliding slots no later query can see (a left shift of at most window - 1 slots per row)."""
        keep_from, after = lay.sliding_keep_from, np.broadcast_to(lay.sliding_kept_after, lay.sliding_keep_from.shape)
        uniform = (keep_from == keep_from[0]).all() and (after == after[0]).all()
        spans = ([(rows, int(keep_from[0]), int(after[0]))] if uniform else
                 [(r, int(keep_from[j]), int(after[j])) for j, r in enumerate(range(*rows.indices(self.rows)))])
        for i, sliding in enumerate(self.sliding):
            if not sliding:
                continue
            for store in self._stores():
                for where, f, n in spans:
                    if f:
                        store[i] = self._set(store[i], (where, slice(None), slice(0, n)),
                                             self._snapshot(store[i][where, :, f:f + n]))
        self.layout.advance(rows, new_valid)

    # -- reading it --------------------------------------------------------------------------------------------------
    @property
    def keys(self) -> list:
        """Per layer, the kept keys of a cache whose rows share one length (what tests compare with the reference)."""
        return [self._used(self.key_buffers, i) for i in range(len(self.sliding))]

    @property
    def values(self) -> list:
        return [self._used(self.value_buffers, i) for i in range(len(self.sliding))]

    def _used(self, store, i):
        n = int(self.layout.length.max())
        width = min(n, self.cfg.sliding_window - 1) if self.sliding[i] else n
        return store[i][: self.rows, :, :width]

    @property
    def valid(self) -> np.ndarray:
        return self.layout.valid[:, : int(self.layout.length.max())]

    @property
    def has_padding(self) -> bool:
        """Whether any row holds a pad position."""
        return bool(self.rows) and not self.layout.uniform(slice(0, self.rows))

    @property
    def length(self) -> int:
        return int(self.layout.length.max()) if self.rows else 0

    def nbytes(self, rows: slice | None = None) -> int:
        """Bytes the rows' kept keys and values take (capacity not counted)."""
        rows = slice(0, self.rows) if rows is None else rows
        n = self.layout.length[rows]
        total = 0
        for i, sliding in enumerate(self.sliding):
            b = self.key_buffers[i]
            per_slot = b.shape[1] * b.shape[3] * b.itemsize * 2
            total += int(np.minimum(n, self.cfg.sliding_window - 1).sum() if sliding else n.sum()) * per_slot
        return total
