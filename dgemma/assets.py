"""Where the default models live: the models shipped inside the package (the Sudoku solver, and a small text model
once one ships), otherwise a small random checkpoint that dgemma writes once into its cache folder."""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
SUDOKU_MODEL = ASSETS / "sudoku"      # the shipped Sudoku model ("dgemma_task": "sudoku")
TEXT_MODEL = ASSETS / "text"          # the shipped text model ("dgemma_task": "text"), where installed
PACKAGED_MODEL = SUDOKU_MODEL         # the default of `dgemma.load()` and `dgemma sudoku solve`
RANDOM_MODEL_NAME = "random-tiny-v1"


def cache_dir() -> Path:
    return Path(os.environ.get("DGEMMA_CACHE", Path.home() / ".cache" / "dgemma"))


def default_model_path() -> Path:
    if (PACKAGED_MODEL / "config.json").exists():
        return PACKAGED_MODEL
    return random_model_path()


def text_model_path() -> Path | None:
    """The shipped text model's folder, None while the package has none."""
    return TEXT_MODEL if (TEXT_MODEL / "config.json").exists() else None


def is_random_default(path: Path) -> bool:
    return Path(path).resolve() == (cache_dir() / RANDOM_MODEL_NAME).resolve()


def random_model_path() -> Path:
    path = cache_dir() / RANDOM_MODEL_NAME
    if not (path / "model.safetensors").exists():
        from .random_model import write_random_checkpoint

        write_random_checkpoint(path)
    return path
