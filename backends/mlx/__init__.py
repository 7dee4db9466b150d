"""The MLX backend: `dgemma.load(path, backend="mlx")`."""

from .backend import MLXBackend, MLXOps, MLXRowNoise
from .model import DiffusionGemmaText, quantize_model, sanitize

__all__ = ["MLXBackend", "MLXOps", "MLXRowNoise", "DiffusionGemmaText", "quantize_model", "sanitize"]
