"""Checkpoint conversion and quantization between the Hugging Face, MLX and CUDA formats (`dgemma convert`).

Imports neither torch nor mlx until a conversion runs (a dry run needs neither)."""

from .convert import ConvertReport, convert, make_target

__all__ = ["convert", "ConvertReport", "make_target"]
