"""Moved to `dgemma.tasks.sudoku.puzzles` (the Sudoku task package); this module re-exports it so that older imports
(`from dgemma.sudoku import parse`) keep working."""

from .tasks.sudoku import puzzles as _puzzles

globals().update({k: v for k, v in vars(_puzzles).items() if not k.startswith("__")})
