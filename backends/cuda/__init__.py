"""PyTorch backend: `dgemma generate --backend cuda` (CUDA GPUs; also runs on CPU)."""

from .backend import TorchBackend, TorchOps

__all__ = ["TorchBackend", "TorchOps"]
