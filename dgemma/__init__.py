"""dgemma: DiffusionGemma on Apple Silicon (MLX) and NVIDIA GPUs (PyTorch) from one backend-neutral core.

    model = dgemma.load("google/diffusiongemma-26B-A4B-it", backend="cuda")
    print(model.generate("Why is the sky blue?", chat=True, max_new_tokens=256).text)

This package imports neither torch nor mlx; backends are imported when first used.
"""

from .errors import DgemmaError

__version__ = "0.1.0"
__all__ = ["load", "Model", "DgemmaError", "__version__"]


def __getattr__(name):  # lazy: keep `import dgemma` fast
    if name in ("load", "Model", "Generation", "GenerationStats", "CanvasChunk", "Logits"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'dgemma' has no attribute {name!r}")
