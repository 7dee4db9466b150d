"""Moved to `dgemma.tasks.sudoku.task` (the Sudoku task package); this module re-exports it so that older imports
(`from dgemma.sudoku_task import solve_puzzles`) keep working."""

from .tasks.sudoku import task as _task

globals().update({k: v for k, v in vars(_task).items() if not k.startswith("__")})
