"""Sudoku toolkit for the fine-tuning recipe: board format, rule checker, exact solver, unique-puzzle generator.

Pure Python + numpy (no torch / mlx), so data generation and evaluation run in any process, workers included.

A board is an 81-character string in row-major order: '1'-'9' for digits and '.' for a blank ('0' is accepted as a
blank on input and normalised to '.').

Solver: bitmask constraint tracking (one 9-bit "used" mask per row, column and box) and depth-first search. Each node
first fills every forced cell (a cell with one candidate; a digit with one place left in a row, column or box) and
prunes a digit with no place left, then branches on the cell with the fewest candidates. Norvig's "hard1" (in the
tests) solves in ~3 ms and is proved unique in ~20 ms; generated 24-given puzzles solve in ~1 ms.

Generator: a random full grid (random diagonal boxes completed by a randomised search, so grids are not relabelled
copies of one base pattern), then cells are removed in random order while the puzzle keeps a unique solution, until
exactly `givens` remain. Uniqueness after removing a cell is checked without counting solutions: we already know one
solution, so the puzzle stays unique iff no solution puts a *different* digit in the removed cell, and when no other
digit even fits the cell no search is needed at all. A cell that cannot be removed stays: removing more cells only
adds solutions, so it could never be removed later either.

Measured speed (CPython 3.11, one process on the 2-core dev box, CPU time): 1000 "medium" puzzles (30-39 givens) in
~1.5 s (wall ~3 s while the box was shared with other jobs); 1000 "easy" in ~0.8 s; 1000 "hard" (24-29 givens; about
half the grids cannot be carved down to 24, so those take a second grid) in ~9 s. So 100k medium puzzles take ~2.5 CPU
minutes, 100k hard ~15. `generate_dataset(..., workers=k)` splits the work over k processes; the result does not
depend on k.
"""

from __future__ import annotations

from dataclasses import dataclass

import multiprocessing
import os
import random
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np

__all__ = [
    "DIFFICULTY",
    "MIN_GIVENS",
    "RngLike",
    "count_solutions",
    "difficulty_of",
    "format_grid",
    "generate",
    "generate_dataset",
    "is_valid_solution",
    "parse",
    "solve",
    "violations",
]

# Givens per difficulty band, both ends inclusive. Read-only so a caller cannot silently change every later dataset.
DIFFICULTY: Mapping[str, tuple[int, int]] = MappingProxyType({"easy": (40, 50), "medium": (30, 39), "hard": (24, 29)})

# No 9x9 Sudoku with fewer than 17 givens has a unique solution (McGuire et al., 2012).
MIN_GIVENS = 17

# Anything `generate` accepts as a source of randomness; an int (or None, meaning fresh OS entropy) is a seed.
RngLike = int | random.Random | np.random.Generator | None

BLANK = "."
_DIGITS = "123456789"
_FULL = 0x1FF  # all nine digit bits

# Per-cell (row, column, box) indices, precomputed because the search reads them at every node.
_UNITS: tuple[tuple[int, int, int], ...] = tuple((i // 9, i % 9, (i // 27) * 3 + (i % 9) // 3) for i in range(81))
_POPCOUNT: tuple[int, ...] = tuple(m.bit_count() for m in range(512))
# The single-bit values inside each 9-bit mask, lowest digit first: the branches to try for a candidate mask.
_BITS: tuple[tuple[int, ...], ...] = tuple(tuple(1 << k for k in range(9) if m >> k & 1) for m in range(512))
_BIT_OF_CHAR = {str(d): 1 << (d - 1) for d in range(1, 10)}
_CHAR_OF_BIT = {1 << (d - 1): str(d) for d in range(1, 10)}

# For `violations`: the 27 units (9 rows, 9 columns, 9 boxes) as lists of cell indices.
_UNIT_CELLS: tuple[tuple[int, ...], ...] = (
    tuple(tuple(r * 9 + c for c in range(9)) for r in range(9))
    + tuple(tuple(r * 9 + c for r in range(9)) for c in range(9))
    + tuple(
        tuple((br * 3 + r) * 9 + bc * 3 + c for r in range(3) for c in range(3)) for br in range(3) for bc in range(3)
    )
)


# --------------------------------------------------------------------------------------------------------------------
# Format
# --------------------------------------------------------------------------------------------------------------------


def parse(s: str) -> str:
    """Validate and normalise a board: all whitespace is dropped (so a 9-line grid works), '0' becomes '.'.

    Raises ValueError naming the first bad character (with its cell) or the wrong length."""
    if not isinstance(s, str):
        raise TypeError(f"a sudoku board must be a str, got {type(s).__name__}")
    compact = "".join(s.split())
    for pos, ch in enumerate(compact):
        if ch not in _DIGITS and ch not in ".0":
            # The position is within the compacted text, which is also the cell index when the length is right.
            raise ValueError(
                f"bad character {ch!r} at cell {pos} (row {pos // 9 + 1}, column {pos % 9 + 1}) of the sudoku board: "
                "only '1'-'9', and '.' or '0' for a blank, are allowed"
            )
    if len(compact) != 81:
        raise ValueError(f"a sudoku board must have 81 cells, got {len(compact)}")
    return compact.replace("0", BLANK)


def format_grid(board: str) -> str:
    """Pretty 9x9 text with box separators, blanks shown as '.':

    4 . . | . . . | 8 . 5
    ...
    ------+-------+------
    """
    board = parse(board)
    lines = []
    for r in range(9):
        if r in (3, 6):
            lines.append("------+-------+------")
        row = board[r * 9 : r * 9 + 9]
        lines.append(" | ".join(" ".join(row[c : c + 3]) for c in (0, 3, 6)))
    return "\n".join(lines)


def _givens_count(board: str) -> int:
    return 81 - board.count(BLANK)


# --------------------------------------------------------------------------------------------------------------------
# Validator
# --------------------------------------------------------------------------------------------------------------------


def violations(board: str, givens: str | None = None) -> set[int]:
    """Cells (0..80) that break a rule.

    Every cell holding a digit that appears more than once in its row, column or box is marked (all copies, since
    the rules do not say which one is wrong). With `givens` (the puzzle), a given that the board overwrote or blanked
    is marked too. Blank cells are not violations: completeness is `is_valid_solution`'s job."""
    board = parse(board)
    bad: set[int] = set()
    for cells in _UNIT_CELLS:
        where: dict[str, list[int]] = {}
        for i in cells:
            if board[i] != BLANK:
                where.setdefault(board[i], []).append(i)
        for same in where.values():
            if len(same) > 1:
                bad.update(same)
    if givens is not None:
        givens = parse(givens)
        bad.update(i for i in range(81) if givens[i] != BLANK and board[i] != givens[i])
    return bad


def is_valid_solution(puzzle: str, solution: str) -> bool:
    """True iff `solution` is complete, breaks no rule and keeps every given of `puzzle`.

    A malformed `solution` (wrong length, stray characters) is simply not a valid solution, so model output can be
    scored without a try/except; a malformed `puzzle` is the caller's bug and raises ValueError."""
    puzzle = parse(puzzle)
    try:
        solution = parse(solution)
    except (TypeError, ValueError):
        return False
    return BLANK not in solution and not violations(solution, puzzle)


def difficulty_of(puzzle: str) -> str:
    """'easy' (>= 40 givens), 'medium' (30-39) or 'hard' (< 30), matching the `DIFFICULTY` bands.

    Puzzles outside the generated bands fall into the nearest open-ended band (e.g. 60 givens is 'easy')."""
    n = _givens_count(parse(puzzle))
    if n >= DIFFICULTY["easy"][0]:
        return "easy"
    if n >= DIFFICULTY["medium"][0]:
        return "medium"
    return "hard"


# --------------------------------------------------------------------------------------------------------------------
# Exact solver
# --------------------------------------------------------------------------------------------------------------------


class _State:
    """A partly filled grid as bits: grid[i] is 0 or one digit bit; rows/cols/boxes hold the bits used in each unit;
    `empties` lists the blank cells (the search reorders it in place, it is used as a set)."""

    __slots__ = ("boxes", "cols", "empties", "grid", "rows")

    def __init__(self, grid: list[int], rows: list[int], cols: list[int], boxes: list[int], empties: list[int]):
        self.grid, self.rows, self.cols, self.boxes, self.empties = grid, rows, cols, boxes, empties

    @classmethod
    def from_board(cls, board: str) -> _State | None:
        """The state of a parsed board, or None when its givens already clash (then it has no solution)."""
        grid = [0] * 81
        rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
        empties: list[int] = []
        for i, ch in enumerate(board):
            if ch == BLANK:
                empties.append(i)
                continue
            bit = _BIT_OF_CHAR[ch]
            r, c, b = _UNITS[i]
            # The search assumes the givens are consistent; a clash must be caught here or it would go unnoticed.
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return None
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            grid[i] = bit
        return cls(grid, rows, cols, boxes, empties)

    def board(self) -> str:
        return "".join(_CHAR_OF_BIT.get(bit, BLANK) for bit in self.grid)

    def search(
        self, limit: int, rng: random.Random | None = None, keep_first: bool = False, deduce: bool = True
    ) -> int:
        """Count completions up to `limit`. With `keep_first`, the grid is left holding the first solution found;
        otherwise the state is restored exactly. With `rng`, digits are tried in random order (for random grids)."""
        return _search(self.grid, self.rows, self.cols, self.boxes, self.empties, 0, limit, rng, keep_first, deduce)


def _search(
    grid: list[int],
    rows: list[int],
    cols: list[int],
    boxes: list[int],
    empties: list[int],
    depth: int,
    limit: int,
    rng: random.Random | None,
    keep_first: bool,
    deduce: bool = True,
) -> int:
    """Depth-first search over the open cells empties[depth:], counting solutions up to `limit`.

    Each node first fills every forced cell: a cell with one candidate, and (with `deduce`) a digit with one place
    left in a unit; then it branches over the candidates of the cell with the fewest. Forced cells are filled in a
    loop at the node, not one recursion level each, because most of the generator's searches are long forced chains.

    This is the hot loop of both the solver and the generator, so it works on plain lists and locals rather than
    objects, and leaves every list as it found it (except the order of `empties`) unless `keep_first` stops it on the
    first solution."""
    n_empty = len(empties)
    start = depth  # empties[start:depth] are the cells this node fills by deduction, undone before returning
    found = 0
    while True:
        if depth == n_empty:
            found = 1
            break
        # Candidates of every open cell, kept for the digit-side pass below (filled cells stay 0 there).
        cands = [0] * 81
        best_j, best_mask, best_count = depth, 0, 10
        placed = False
        dead = False
        for j in range(depth, n_empty):
            i = empties[j]
            r, c, b = _UNITS[i]
            mask = _FULL ^ (rows[r] | cols[c] | boxes[b])
            count = _POPCOUNT[mask]
            if count == 1:
                # Fill it now. Its mask reflects every cell filled so far, so two cells forced to the same digit in
                # one unit show up as a cell with no candidate, never as a silent double placement. The cell moved
                # into slot j was scanned already, so the scan can go on from j + 1.
                rows[r] |= mask
                cols[c] |= mask
                boxes[b] |= mask
                grid[i] = mask
                empties[j], empties[depth] = empties[depth], i
                depth += 1
                placed = True
            elif count == 0:
                dead = True
                break
            else:
                cands[i] = mask
                if count < best_count:
                    best_j, best_mask, best_count = j, mask, count
        if dead:
            break
        if placed:
            continue  # masks seen before the last fill may be stale: rescan before choosing a branch
        if deduce:
            # No cell is forced by its own candidates, so look from the digits' side before guessing: a digit with
            # no place left in a unit is a dead end, one with a single place is forced there (a "hidden single").
            # This cuts the search on hard puzzles several times over.
            used = rows + cols + boxes
            hidden_cell = -1
            for u, cells in enumerate(_UNIT_CELLS):
                once = twice = 0  # digits with at least one, at least two places in this unit
                for i in cells:
                    mask = cands[i]
                    twice |= once & mask
                    once |= mask
                if (once | used[u]) != _FULL:
                    dead = True
                    break
                hidden = once & ~twice
                if hidden:
                    best_mask = hidden & -hidden
                    hidden_cell = next(i for i in cells if cands[i] & best_mask)
                    break
            if dead:
                break
            if hidden_cell >= 0:
                r, c, b = _UNITS[hidden_cell]
                rows[r] |= best_mask
                cols[c] |= best_mask
                boxes[b] |= best_mask
                grid[hidden_cell] = best_mask
                j = empties.index(hidden_cell, depth)
                empties[j], empties[depth] = empties[depth], hidden_cell
                depth += 1
                continue
        # Nothing is forced: branch on the most constrained cell, moved to slot `depth` so that empties[depth + 1:]
        # are the cells left open below.
        empties[depth], empties[best_j] = empties[best_j], empties[depth]
        i = empties[depth]
        r, c, b = _UNITS[i]
        branches: tuple[int, ...] | list[int] = _BITS[best_mask]
        if rng is not None:
            branches = rng.sample(branches, best_count)
        for bit in branches:
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            grid[i] = bit
            found += _search(grid, rows, cols, boxes, empties, depth + 1, limit - found, rng, keep_first, deduce)
            if found and keep_first:
                return found
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
            grid[i] = 0
            if found >= limit:
                break
        break
    if found and keep_first:
        return found
    for j in range(start, depth):
        i = empties[j]
        bit = grid[i]
        r, c, b = _UNITS[i]
        rows[r] ^= bit
        cols[c] ^= bit
        boxes[b] ^= bit
        grid[i] = 0
    return found


def solve(puzzle: str) -> str | None:
    """The first solution found (the only one, for a proper puzzle), or None when there is none."""
    state = _State.from_board(parse(puzzle))
    if state is None or state.search(1, keep_first=True) == 0:
        return None
    return state.board()


def count_solutions(puzzle: str, limit: int = 2) -> int:
    """The number of solutions, counting no further than `limit` (the default 2 answers "is it unique?")."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    state = _State.from_board(parse(puzzle))
    return 0 if state is None else state.search(limit)


# --------------------------------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------------------------------


def _as_random(rng: RngLike) -> random.Random:
    """One `random.Random` for the generator: an int seeds it (deterministic), a `random.Random` is used as is (and
    advances), a numpy Generator provides a seed (and advances), None takes OS entropy."""
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, np.random.Generator):
        return random.Random(int(rng.integers(0, 2**63)))
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        return random.Random(None if rng is None else int(rng))
    raise TypeError(f"rng must be an int seed, random.Random, numpy Generator or None, got {type(rng).__name__}")


def _random_full_grid(rng: random.Random) -> _State:
    """A random complete grid. The three diagonal boxes share no row or column, so each gets an independent random
    permutation; the randomised search (digits tried in random order) then completes the rest. Any such start can be
    completed (checked on 20k samples too), and it is about twice as fast as searching from an empty board."""
    grid, rows, cols, boxes = [0] * 81, [0] * 9, [0] * 9, [0] * 9
    for box in (0, 4, 8):
        for i, bit in zip(_UNIT_CELLS[18 + box], rng.sample(_BITS[_FULL], 9)):
            r, c, b = _UNITS[i]
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            grid[i] = bit
    state = _State(grid, rows, cols, boxes, [i for i in range(81) if not grid[i]])
    # Digit-side deduction would only slow this search down: it almost never backtracks.
    state.search(1, rng=rng, keep_first=True, deduce=False)
    return state


def _blank(grid: list[int], rows: list[int], cols: list[int], boxes: list[int], i: int) -> int:
    """Empty filled cell i (its digit leaves its row, column and box masks); returns the digit's bit."""
    bit = grid[i]
    r, c, b = _UNITS[i]
    rows[r] ^= bit
    cols[c] ^= bit
    boxes[b] ^= bit
    grid[i] = 0
    return bit


def _refill(grid: list[int], rows: list[int], cols: list[int], boxes: list[int], i: int, bit: int) -> None:
    r, c, b = _UNITS[i]
    rows[r] |= bit
    cols[c] |= bit
    boxes[b] |= bit
    grid[i] = bit


def _removable(grid: list[int], rows: list[int], cols: list[int], boxes: list[int], empties: list[int],
               i: int) -> bool:
    """Whether filled cell i can be blanked with the puzzle keeping its unique solution (the filled cells of `grid`
    are a unique puzzle whose solution has grid[i] at i). Leaves every list as it found it. The puzzle has one
    solution (the full grid); without this cell it still has exactly one iff no solution puts another digit here, and
    if no other digit even fits the cell's row/column/box that needs no search at all."""
    bit = _blank(grid, rows, cols, boxes, i)
    r, c, b = _UNITS[i]
    unique = True
    for other in _BITS[(_FULL ^ (rows[r] | cols[c] | boxes[b])) & ~bit]:
        rows[r] |= other
        cols[c] |= other
        boxes[b] |= other
        solvable = _search(grid, rows, cols, boxes, empties, 0, 1, None, False)
        rows[r] ^= other
        cols[c] ^= other
        boxes[b] ^= other
        if solvable:
            unique = False
            break
    _refill(grid, rows, cols, boxes, i, bit)
    return unique


def _carve(full: _State, givens: int, rng: random.Random) -> str | None:
    """Blank cells of a complete grid in random order while the puzzle stays unique; the puzzle once exactly `givens`
    remain, or None when every cell has been tried and the puzzle is still larger (this grid and order cannot get
    that low)."""
    grid, rows, cols, boxes = full.grid[:], full.rows[:], full.cols[:], full.boxes[:]
    empties: list[int] = []
    order = list(range(81))
    rng.shuffle(order)
    filled = 81
    for i in order:
        if filled == givens:
            break
        if _removable(grid, rows, cols, boxes, empties, i):
            _blank(grid, rows, cols, boxes, i)
            empties.append(i)
            filled -= 1
    if filled != givens:
        return None
    return "".join(_CHAR_OF_BIT.get(bit, BLANK) for bit in grid)


def generate(givens: int, rng: RngLike = None, max_grids: int = 200) -> tuple[str, str]:
    """A (puzzle, solution) pair whose puzzle has exactly `givens` filled cells and a unique solution.

    Deterministic for an int seed (or an identically seeded random.Random / numpy Generator). A random removal order
    usually stops being able to remove cells at about 22-27 givens, so low targets may take several grids; after
    `max_grids` grids RuntimeError is raised (targets below ~22 are rarely reachable this way)."""
    if isinstance(givens, bool) or not isinstance(givens, (int, np.integer)):
        raise TypeError(f"givens must be an int, got {type(givens).__name__}")
    if not MIN_GIVENS <= givens <= 81:
        raise ValueError(f"givens must be between {MIN_GIVENS} and 81 (no unique sudoku has fewer), got {givens}")
    if max_grids < 1:
        raise ValueError(f"max_grids must be at least 1, got {max_grids}")
    rand = _as_random(rng)
    for _ in range(max_grids):
        full = _random_full_grid(rand)
        puzzle = _carve(full, int(givens), rand)
        if puzzle is not None:
            return puzzle, full.board()
    raise RuntimeError(
        f"could not reach a unique puzzle with {givens} givens from {max_grids} random grids; "
        "ask for more givens or a larger max_grids"
    )


def _band(difficulty: str | tuple[int, int]) -> tuple[int, int]:
    """The inclusive (lo, hi) givens range of a difficulty name or an explicit pair, validated."""
    if isinstance(difficulty, str):
        if difficulty not in DIFFICULTY:
            names = ", ".join(DIFFICULTY)
            raise ValueError(f"unknown difficulty {difficulty!r}; expected one of {names} or a (lo, hi) pair")
        return DIFFICULTY[difficulty]
    try:
        lo, hi = (int(v) for v in difficulty)
    except (TypeError, ValueError):
        raise ValueError(f"difficulty must be a name or a (lo, hi) pair of givens counts, got {difficulty!r}") from None
    if not MIN_GIVENS <= lo <= hi <= 81:
        raise ValueError(f"givens range must satisfy {MIN_GIVENS} <= lo <= hi <= 81, got ({lo}, {hi})")
    return lo, hi


def _dataset_item(job: tuple[int, int, int, int]) -> tuple[str, str]:
    """Puzzle `index` of a dataset, a function of (seed, index, band) alone: that is what makes a dataset the same
    for any number of workers and any chunking. Top-level so worker processes can unpickle it."""
    seed, index, lo, hi = job
    # SeedSequence gives statistically independent streams for neighbouring indices, unlike seeding with seed + index.
    state = np.random.SeedSequence(entropy=seed, spawn_key=(index,)).generate_state(4, np.uint64)
    rand = random.Random(int.from_bytes(state.tobytes(), "little"))
    return generate(rand.randint(lo, hi), rand)


def generate_dataset(
    n: int, difficulty: str | tuple[int, int], seed: int = 0, workers: int | None = 1
) -> list[tuple[str, str]]:
    """`n` (puzzle, solution) pairs with givens drawn uniformly from the band (a `DIFFICULTY` name or an inclusive
    (lo, hi) pair). Deterministic for a seed, whatever `workers` is (None: one per CPU). Worker processes use the
    platform's default start method; a parent with many threads (e.g. torch) may prefer to call this before them."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    lo, hi = _band(difficulty)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    jobs = [(int(seed), i, lo, hi) for i in range(n)]
    if workers == 1 or n < 2:
        return [_dataset_item(job) for job in jobs]
    # Chunks amortise inter-process overhead (one puzzle is only a few ms) but stay small enough to balance the load.
    chunksize = max(1, min(256, n // (workers * 8)))
    with multiprocessing.Pool(min(workers, n)) as pool:
        return pool.map(_dataset_item, jobs, chunksize=chunksize)


def _validity_preserving_permutation(rng: np.random.Generator) -> np.ndarray:
    """Cell index map new[i] = old[perm[i]] of a random Sudoku symmetry: bands, rows within a band, stacks, columns
    within a stack, and an optional transpose. Each keeps every row, column and box a row, column or box."""
    rows = (rng.permutation(3)[:, None] * 3 + np.stack([rng.permutation(3) for _ in range(3)])).reshape(9)
    cols = (rng.permutation(3)[:, None] * 3 + np.stack([rng.permutation(3) for _ in range(3)])).reshape(9)
    grid = rows[:, None] * 9 + cols[None, :]
    if rng.random() < 0.5:
        grid = grid.T
    return grid.reshape(81)


@dataclass(frozen=True)
class Symmetry:
    """A Sudoku symmetry: a validity-preserving permutation of the cells (new[i] = old[cells[i]]) and a relabelling
    of the digits (digit d becomes relabel[d]; relabel[0] is '.'). It maps a puzzle with a unique solution to one
    with the same number of givens and the mapped solution."""

    cells: tuple[int, ...]
    relabel: str

    def apply(self, board: str) -> str:
        b = [self.relabel[0 if c == BLANK else int(c)] for c in parse(board)]
        return "".join(b[j] for j in self.cells)

    def undo(self, board: str) -> str:
        """The inverse map: `undo(apply(b)) == b`. Characters that are not digits come back as '.'."""
        unlabel = {self.relabel[d]: str(d) for d in range(1, 10)}
        out = [BLANK] * 81
        for i, j in enumerate(self.cells):
            out[j] = unlabel.get(board[i], BLANK)
        return "".join(out)


IDENTITY = Symmetry(tuple(range(81)), BLANK + _DIGITS)


def random_symmetry(rng: np.random.Generator) -> Symmetry:
    """A uniformly drawn symmetry from the group `augment` samples (cells first, then digits, as augment draws)."""
    perm = _validity_preserving_permutation(rng)
    relabel = BLANK + "".join(str(d) for d in rng.permutation(9) + 1)
    return Symmetry(tuple(int(j) for j in perm), relabel)


def augment(puzzles: Sequence[str], solutions: Sequence[str], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Equivalent (puzzle, solution) pairs under a random symmetry each: a relabelling of the digits and a
    validity-preserving permutation of the cells. A unique puzzle stays unique and keeps its number of givens, so a
    pool of a few thousand puzzles gives practically unlimited distinct training examples (9! x 3!^8 x 2 each)."""
    out = []
    for puzzle, solution in zip(puzzles, solutions):
        sym = random_symmetry(rng)
        out.append((sym.apply(puzzle), sym.apply(solution)))
    return out
