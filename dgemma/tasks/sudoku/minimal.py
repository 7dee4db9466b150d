"""Hard Sudoku puzzles: unique-solution puzzles with fewer than 27 givens, minimal or near-minimal.

A puzzle is *minimal* when it has a unique solution and removing any one of its givens gives it a second one. The
generator carves a random full grid (`puzzles._random_full_grid`): it visits the 81 cells in a random order and
blanks each one the puzzle can lose while keeping its unique solution, until no visited cell could go (the result is
then minimal) or a target number of givens is left (near-minimal: the cells not yet visited might still go). A puzzle
whose carve ends above `max_givens` (26 by default: fewer than 27) is thrown away and the next grid is carved.

Why one pass gives a minimal puzzle: a cell that could not be blanked at some point made the puzzle non-unique
without it; every later puzzle has a subset of those givens, so without that cell it has at least as many solutions,
and the cell can never be blanked later either. So a cell needs one uniqueness check, made the way `puzzles._carve`
makes it: we know the one solution, so the puzzle without the cell stays unique iff no solution puts a different
digit there (one exact-solver search per other digit that fits; none when no other digit fits).

Random minimal puzzles have about 22-26 givens (measured below); a target under ~21 is reached by few grids, so
`generate_hard` gives up after `max_grids` grids (RuntimeError) rather than run for minutes.

Measured speed (CPython 3.11, one process on the shared 2-core dev box, CPU time): 1000 minimal puzzles in 8.6 s
(117/s; givens 21-26, mostly 23-25), near-minimal at a target of 24-26 141/s, minimal needing a guess 68/s, exactly
22 givens 3.9/s (examples/sudoku/RUNS.md, "Hard puzzles"). numpy only seeds the streams: the carve is a recursive
bitmask search over Python ints, which arrays would not speed up.
`generate_hard_dataset(..., workers=k)` splits the work over k processes; the result does not depend on k.
"""

from __future__ import annotations

import multiprocessing
import os
import random
from collections.abc import Sequence

import numpy as np

from .puzzles import (_CHAR_OF_BIT, _FULL, _POPCOUNT, _UNIT_CELLS, _UNITS, MIN_GIVENS, RngLike, _as_random, _blank,
                      _random_full_grid, _removable, _State, count_solutions, parse, solve)

__all__ = ["MAX_GIVENS", "generate_hard", "generate_hard_dataset", "givens_histogram", "is_minimal",
           "removable_givens", "solved_by_singles"]

# "Hard" in the sense of the issue: fewer than 27 givens.
MAX_GIVENS = 26
# Mixed into every dataset seed, so a hard dataset never shares its random streams with `generate_dataset`'s.
_STREAM = 0x4D494E  # "MIN"


def _carve_hard(full, rng: random.Random, target: int | None) -> tuple[str, bool]:
    """One random-order pass over a full grid's cells, blanking each one that keeps the solution unique; stops once
    `target` givens are left. (puzzle, minimal): minimal is True when every cell was visited."""
    grid, rows, cols, boxes = full.grid[:], full.rows[:], full.cols[:], full.boxes[:]
    empties: list[int] = []
    order = list(range(81))
    rng.shuffle(order)
    filled = 81
    visited_all = True
    for i in order:
        if target is not None and filled == target:
            visited_all = False
            break
        if _removable(grid, rows, cols, boxes, empties, i):
            _blank(grid, rows, cols, boxes, i)
            empties.append(i)
            filled -= 1
    return "".join(_CHAR_OF_BIT.get(bit, ".") for bit in grid), visited_all


def _check_givens(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not MIN_GIVENS <= value <= 80:
        raise ValueError(f"{name} must be between {MIN_GIVENS} and 80 (no unique sudoku has fewer), got {value}")
    return int(value)


def generate_hard(rng: RngLike = None, *, target: int | None = None, max_givens: int = MAX_GIVENS,
                  minimal: bool = False, needs_guess: bool = False, max_grids: int = 1000) -> tuple[str, str]:
    """A (puzzle, solution) pair: a unique-solution puzzle with at most `max_givens` givens, carved from a random grid.

    target=None: carved until no given can be removed, so the puzzle is minimal (usually 22-26 givens).
    target=G: carving stops once exactly G givens are left (near-minimal); with `minimal=True` only a puzzle that is
    minimal at G is kept (the carve could remove nothing more), which costs more grids. `needs_guess=True` keeps
    only puzzles that singles alone cannot solve (`solved_by_singles`; about half of the minimal ones).
    Deterministic for an int seed (or an identically seeded random.Random / numpy Generator). RuntimeError after
    `max_grids` grids without such a puzzle (a target or max_givens under ~21 is rarely reached)."""
    max_givens = _check_givens("max_givens", max_givens)
    if target is not None:
        target = _check_givens("target", target)
        if target > max_givens:
            raise ValueError(f"target ({target}) must be at most max_givens ({max_givens})")
    if max_grids < 1:
        raise ValueError(f"max_grids must be at least 1, got {max_grids}")
    rand = _as_random(rng)
    for _ in range(max_grids):
        full = _random_full_grid(rand)
        puzzle, visited_all = _carve_hard(full, rand, target)
        n = 81 - puzzle.count(".")
        if n > max_givens or (target is not None and n != target):
            continue
        if minimal and not visited_all and removable_givens(puzzle, full.board()):
            continue
        if needs_guess and solved_by_singles(puzzle):
            continue
        return puzzle, full.board()
    what = f"exactly {target}" if target is not None else f"at most {max_givens}"
    kind = " (minimal)" * minimal + " (needing a guess)" * needs_guess
    raise RuntimeError(f"no unique puzzle with {what} givens{kind} from {max_grids} "
                       "random grids; ask for more givens or a larger max_grids")


def removable_givens(puzzle: str, solution: str | None = None) -> list[int]:
    """The givens (cell indices) of a unique-solution puzzle that could be blanked with the solution staying unique;
    empty iff the puzzle is minimal. ValueError when the puzzle does not have exactly one solution."""
    board = parse(puzzle)
    if count_solutions(board) != 1:
        raise ValueError("removable_givens needs a puzzle with exactly one solution")
    solved = _State.from_board(parse(solution) if solution is not None else solve(board))
    # The lists describe the puzzle: its solution's digits at the givens, its blanks as empties.
    grid = [solved.grid[i] if board[i] != "." else 0 for i in range(81)]
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, bit in enumerate(grid):
        r, c, b = _UNITS[i]
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
    empties = [i for i in range(81) if not grid[i]]
    return [i for i in range(81) if grid[i] and _removable(grid, rows, cols, boxes, empties, i)]


def is_minimal(puzzle: str) -> bool:
    """True iff the puzzle has exactly one solution and loses that property when any one given is removed."""
    try:
        return not removable_givens(puzzle)
    except ValueError:
        return False


def _hard_item(job: tuple[int, int, int, int, bool, bool]) -> tuple[str, str]:
    """Puzzle `index` of a hard dataset, a function of (seed, index, targets) alone, so the dataset does not depend on
    the number of workers. Top-level so worker processes can unpickle it."""
    seed, index, lo, hi, minimal, needs_guess = job
    state = np.random.SeedSequence(entropy=[seed, _STREAM], spawn_key=(index,)).generate_state(4, np.uint64)
    rand = random.Random(int.from_bytes(state.tobytes(), "little"))
    if lo == 0:  # no target: minimal puzzles with at most `hi` givens
        return generate_hard(rand, max_givens=hi, needs_guess=needs_guess)
    return generate_hard(rand, target=rand.randint(lo, hi), max_givens=hi, minimal=minimal, needs_guess=needs_guess)


def generate_hard_dataset(n: int, seed: int = 0, *, targets: tuple[int, int] | None = None,
                          max_givens: int = MAX_GIVENS, minimal: bool = False, needs_guess: bool = False,
                          workers: int | None = 1) -> list[tuple[str, str]]:
    """`n` hard (puzzle, solution) pairs, deterministic for a seed whatever `workers` is (None: one per CPU).

    targets=None: minimal puzzles with at most `max_givens` givens (the "minimal" difficulty). targets=(lo, hi):
    each puzzle carved to a target drawn uniformly from lo..hi (inclusive, within 17..max_givens), near-minimal, or
    minimal at that count with `minimal=True`. `needs_guess`: only puzzles that singles alone cannot solve."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    max_givens = _check_givens("max_givens", max_givens)
    if targets is None:
        lo, hi = 0, max_givens
    else:
        lo, hi = (_check_givens("targets", int(v)) for v in targets)
        if not lo <= hi <= max_givens:
            raise ValueError(f"targets must satisfy {MIN_GIVENS} <= lo <= hi <= max_givens ({max_givens}), "
                             f"got {targets}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    jobs = [(int(seed), i, lo, hi, bool(minimal), bool(needs_guess)) for i in range(n)]
    if workers == 1 or n < 2:
        return [_hard_item(job) for job in jobs]
    chunksize = max(1, min(64, n // (workers * 8)))
    with multiprocessing.Pool(min(workers, n)) as pool:
        return pool.map(_hard_item, jobs, chunksize=chunksize)


def solved_by_singles(puzzle: str) -> bool:
    """True iff naked singles (a cell with one candidate) and hidden singles (a digit with one place in a row, column
    or box) alone fill the whole board: no guess needed. A rough rating: a puzzle that needs a guess is hard for
    people, whatever its number of givens (most random minimal puzzles do not need one)."""
    state = _State.from_board(parse(puzzle))
    if state is None:
        return False
    grid, rows, cols, boxes = state.grid, state.rows, state.cols, state.boxes
    while True:
        empty = [i for i in range(81) if not grid[i]]
        if not empty:
            return True
        cands = [0] * 81
        for i in empty:
            r, c, b = _UNITS[i]
            cands[i] = _FULL ^ (rows[r] | cols[c] | boxes[b])
        if not all(cands[i] for i in empty):
            return False
        place = next(((i, cands[i]) for i in empty if _POPCOUNT[cands[i]] == 1), None)
        for cells in _UNIT_CELLS if place is None else ():
            once = twice = 0  # digits with at least one, at least two places in this unit
            for i in cells:
                twice |= once & cands[i]
                once |= cands[i]
            if once & ~twice:
                bit = (once & ~twice) & -(once & ~twice)
                place = (next(i for i in cells if cands[i] & bit), bit)
                break
        if place is None:
            return False
        i, bit = place
        r, c, b = _UNITS[i]
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
        grid[i] = bit


def givens_histogram(puzzles: Sequence[str]) -> dict[int, int]:
    """{number of givens: count} over puzzles, sorted by givens (for reporting a dataset's spread)."""
    counts: dict[int, int] = {}
    for p in puzzles:
        g = 81 - parse(p).count(".")
        counts[g] = counts.get(g, 0) + 1
    return dict(sorted(counts.items()))
