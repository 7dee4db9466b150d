"""The MLX side of the batch KV cache (dgemma.kvcache holds the logic): buffers are mx.arrays updated by slice
assignment (functional: a read of the old buffer never sees a later write)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from dgemma.config import ModelConfig
from dgemma.kvcache import BatchKVCache


class MLXBatchCache(BatchKVCache):
    def __init__(self, cfg: ModelConfig, dtype, pass_width: int):
        self.dtype = dtype
        super().__init__(cfg, pass_width)

    def _zeros(self, shape):
        return mx.zeros(shape, dtype=self.dtype)

    def _set(self, buf, index, value):
        buf[index] = value
        return buf

    def _gather(self, buf, rows):
        return buf[mx.array(rows.astype(np.int32))]

    def _device_mask(self, mask: np.ndarray):
        return mx.array(mask)

    def _set_at(self, buf, rows, slots, value):
        r = mx.array(rows.astype(np.int32))[:, None]
        buf[r, :, mx.array(slots.astype(np.int32))] = value.transpose(0, 2, 1, 3)
        return buf
