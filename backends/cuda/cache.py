"""The PyTorch side of the batch KV cache (dgemma.kvcache holds the logic): buffers are torch tensors written in
place."""

from __future__ import annotations

import numpy as np
import torch

from dgemma.config import ModelConfig
from dgemma.kvcache import BatchKVCache


class TorchBatchCache(BatchKVCache):
    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, pass_width: int):
        self.device, self.dtype = device, dtype
        super().__init__(cfg, pass_width)

    @torch.inference_mode()
    def _zeros(self, shape):
        return torch.zeros(shape, device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def _set(self, buf, index, value):
        buf[index] = value
        return buf

    @torch.inference_mode()
    def _gather(self, buf, rows):
        return buf.index_select(0, torch.as_tensor(rows, device=self.device))

    def _device_mask(self, mask: np.ndarray):
        return torch.as_tensor(np.ascontiguousarray(mask), device=self.device)

    @torch.inference_mode()
    def _set_at(self, buf, rows, slots, value):
        r = torch.as_tensor(rows, device=self.device)[:, None]
        buf[r, :, torch.as_tensor(slots, device=self.device)] = value.transpose(1, 2)
        return buf

    @torch.inference_mode()
    def _snapshot(self, view):
        return view.clone()
