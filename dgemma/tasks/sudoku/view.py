"""The Sudoku board drawn live while it denoises (`dgemma generate --show-canvas` on a Sudoku model), with `rich`.

Each denoising pass redraws the 9x9 board of the puzzle's own view (the first canvas): givens plain, digits the
sampler accepted this pass bold, the rest of the model's current guesses dim, cells still holding noise as '·', and
digits that break a rule red. The final board is printed to stdout by the caller, as without the live view.
"""

from __future__ import annotations

import time

import numpy as np

from .puzzles import BLANK, parse, violations
from .task import DIGIT_IDS

_SEPARATOR = "------+-------+------"


def board_of(tokens) -> str:
    """The first 81 canvas tokens as a board ('.' for anything not a digit)."""
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1)[:81]
    out = ["."] * 81
    for i, t in enumerate(ids):
        if DIGIT_IDS[0] <= t <= DIGIT_IDS[-1]:
            out[i] = str(int(t) - DIGIT_IDS[0] + 1)
    return "".join(out)


def render_board(puzzle: str, board: str, accepted, header: str):
    """A rich Text: the header line, then the board with box separators, styled as the module says."""
    from rich.text import Text

    puzzle = parse(puzzle)
    bad = violations(board, puzzle)
    out = Text()
    out.append(header + "\n", style="bold cyan")
    for r in range(9):
        if r in (3, 6):
            out.append(_SEPARATOR + "\n", style="dim")
        for c in range(9):
            i = r * 9 + c
            if c in (3, 6):
                out.append(" | ", style="dim")
            elif c:
                out.append(" ")
            ch = board[i]
            if puzzle[i] != BLANK:
                style = "red" if i in bad else ""
            elif ch == BLANK:
                ch, style = "·", "dim"
            else:
                style = "bold red" if i in bad else ("bold green" if accepted is not None and accepted[i] else "dim")
            out.append(ch, style=style)
        out.append("\n")
    return out


class LiveBoard:
    """An `on_step` hook for `solve_puzzles` on one puzzle that redraws its board, at most `fps` times a second."""

    def __init__(self, live, puzzle: str, ops, views: int, fps: float = 15.0):
        self.live, self.puzzle, self.ops, self.views = live, parse(puzzle), ops, views
        self.min_gap = 1.0 / fps
        self.last = 0.0
        self.passes = 0

    def __call__(self, block, step, argmax, accepted) -> None:
        self.passes += 1
        now = time.perf_counter()
        if now - self.last < self.min_gap:
            return
        self.last = now
        tokens = np.asarray(self.ops.to_numpy(argmax))
        acc = np.asarray(self.ops.to_numpy(accepted)).astype(bool)
        row = 0  # the puzzle's own view (the identity symmetry) is the first canvas of its group
        board = board_of(tokens.reshape(tokens.shape[0], -1)[row])
        width = f" · {self.views} views side by side, showing the first" if self.views > 1 else ""
        header = f"pass {self.passes}{width} · {sum(ch != BLANK for ch in board)}/81 cells hold a digit"
        self.live.update(render_board(self.puzzle, board, acc.reshape(acc.shape[0], -1)[row][:81], header),
                         refresh=True)

    def finish(self, solution: str, solved: bool) -> None:
        header = f"{'solved' if solved else 'NOT solved'} after {self.passes} passes"
        self.live.update(render_board(self.puzzle, solution, None, header), refresh=True)
