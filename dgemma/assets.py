"""Where the default model lives: the model shipped inside the package when there is one, otherwise a small random
checkpoint that dgemma writes once into its cache folder."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGED_MODEL = Path(__file__).parent / "assets" / "sudoku"
RANDOM_MODEL_NAME = "random-tiny-v1"


def cache_dir() -> Path:
    return Path(os.environ.get("DGEMMA_CACHE", Path.home() / ".cache" / "dgemma"))


def default_model_path() -> Path:
    if (PACKAGED_MODEL / "config.json").exists():
        return PACKAGED_MODEL
    return random_model_path()


def is_random_default(path: Path) -> bool:
    return Path(path).resolve() == (cache_dir() / RANDOM_MODEL_NAME).resolve()


def random_model_path() -> Path:
    path = cache_dir() / RANDOM_MODEL_NAME
    if not (path / "model.safetensors").exists():
        from .random_model import write_random_checkpoint

        write_random_checkpoint(path)
    return path
