"""dgemma.tasks.sudoku.puzzles: format, rule checker, solver, generator and datasets (pure Python, a few seconds)."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from dgemma.tasks.sudoku import puzzles as sudoku

# Norvig's "hard1": hard for plain backtracking, one solution.
HARD = "4.....8.5.3..........7......2.....6.....8.4......1.......6.3.7.5..2.....1.4......"
HARD_SOLUTION = "417369825632158947958724316825437169791586432346912758289643571573291684164875293"
SOLVED = HARD_SOLUTION


def with_blanks(board: str, cells: list[int]) -> str:
    return "".join("." if i in cells else ch for i, ch in enumerate(board))


def with_digit(board: str, cell: int, digit: str) -> str:
    return board[:cell] + digit + board[cell + 1 :]


def givens_of(board: str) -> int:
    return sum(ch != "." for ch in board)


# ------------------------------------------------------------------------------------------------------------ format


def test_parse_normalises_zeros_and_whitespace() -> None:
    rows = [HARD[r * 9 : r * 9 + 9].replace(".", "0") for r in range(9)]
    text = "  " + "\n".join(" ".join(row) for row in rows) + "\n"
    assert sudoku.parse(text) == HARD
    assert sudoku.parse(SOLVED) == SOLVED


@pytest.mark.parametrize("bad, length", [(HARD[:-1], 80), (HARD + "1", 82), ("", 0)])
def test_parse_rejects_wrong_length(bad: str, length: int) -> None:
    with pytest.raises(ValueError, match=f"81 cells, got {length}"):
        sudoku.parse(bad)


def test_parse_names_the_bad_character_and_its_cell() -> None:
    with pytest.raises(ValueError, match=r"'x' at cell 10 \(row 2, column 2\)"):
        sudoku.parse(with_digit(HARD, 10, "x"))
    with pytest.raises(ValueError, match="'-'"):
        sudoku.parse("-" * 81)
    with pytest.raises(TypeError):
        sudoku.parse(list(HARD))  # type: ignore[arg-type]


def test_format_grid_draws_boxes() -> None:
    text = sudoku.format_grid(HARD.replace(".", "0"))
    lines = text.split("\n")
    assert len(lines) == 11
    assert lines[0] == "4 . . | . . . | 8 . 5"
    assert lines[3] == lines[7] == "------+-------+------"
    assert lines[10] == "1 . 4 | . . . | . . ."
    # The digits, read back in order, are the board.
    assert sudoku.parse(text.replace("|", "").replace("-", "").replace("+", "")) == HARD


# --------------------------------------------------------------------------------------------------------- validator


def test_solution_has_no_violations() -> None:
    assert sudoku.violations(SOLVED) == set()
    assert sudoku.violations(HARD) == set()
    assert sudoku.violations(SOLVED, givens=HARD) == set()
    assert sudoku.violations("." * 81) == set()


def test_row_repeat_marks_both_cells() -> None:
    board = "5......5." + "." * 72  # cells 0 and 7: same row, different boxes and columns
    assert sudoku.violations(board) == {0, 7}


def test_column_repeat_marks_both_cells() -> None:
    board = with_digit(with_digit("." * 81, 4, "3"), 76, "3")  # column 4, rows 0 and 8
    assert sudoku.violations(board) == {4, 76}


def test_box_repeat_marks_both_cells() -> None:
    board = with_digit(with_digit("." * 81, 30, "9"), 50, "9")  # rows 3/5, columns 3/5: only the middle box is shared
    assert sudoku.violations(board) == {30, 50}


def test_all_copies_of_a_repeat_are_marked() -> None:
    board = with_digit(with_digit(with_digit("." * 81, 9, "2"), 13, "2"), 17, "2")
    assert sudoku.violations(board) == {9, 13, 17}


def test_swapped_digits_in_a_solution() -> None:
    # Swapping two cells of a row keeps the row valid but repeats a digit in both columns.
    board = list(SOLVED)
    board[0], board[8] = board[8], board[0]
    bad = sudoku.violations("".join(board))
    assert {0, 8} <= bad
    assert all(i % 9 in (0, 8) or i < 27 for i in bad)  # columns 0 and 8, boxes 0 and 2


def test_overwritten_and_blanked_givens() -> None:
    # Relabelling digits 1 <-> 2 gives another valid grid, so only the givens check can flag the changed givens.
    relabelled = SOLVED.translate(str.maketrans("12", "21"))
    assert sudoku.violations(relabelled) == set()
    overwritten = {i for i, ch in enumerate(HARD) if ch in "12"}
    assert overwritten  # HARD has 1s and 2s among its givens
    assert sudoku.violations(relabelled, givens=HARD) == overwritten
    # A blanked given (cell 6 holds the given '8') is flagged; a blanked non-given cell is not.
    assert sudoku.violations(with_blanks(SOLVED, [6])) == set()
    assert sudoku.violations(with_blanks(SOLVED, [6]), givens=HARD) == {6}
    assert sudoku.violations(with_blanks(SOLVED, [1]), givens=HARD) == set()
    # Both kinds of problem are reported together.
    assert sudoku.violations(with_blanks(relabelled, [6]), givens=HARD.replace("0", ".")) == overwritten | {6}


def test_is_valid_solution() -> None:
    assert sudoku.is_valid_solution(HARD, HARD_SOLUTION)
    assert sudoku.is_valid_solution(HARD.replace(".", "0"), HARD_SOLUTION)
    assert not sudoku.is_valid_solution(HARD, with_blanks(HARD_SOLUTION, [1]))  # incomplete
    # A valid grid that does not keep the givens: relabel the digits 1 <-> 2.
    relabelled = HARD_SOLUTION.translate(str.maketrans("12", "21"))
    assert sudoku.violations(relabelled) == set()
    assert not sudoku.is_valid_solution(HARD, relabelled)
    assert sudoku.is_valid_solution(relabelled, relabelled)
    # Model output may be garbage: that is an invalid solution, not an exception.
    assert not sudoku.is_valid_solution(HARD, HARD_SOLUTION[:-1])
    assert not sudoku.is_valid_solution(HARD, "answer: " + HARD_SOLUTION)
    with pytest.raises(ValueError):
        sudoku.is_valid_solution(HARD[:-1], HARD_SOLUTION)


def test_difficulty_of_band_edges() -> None:
    blanks = list(range(81))
    for givens, expected in [
        (81, "easy"),
        (50, "easy"),
        (40, "easy"),
        (39, "medium"),
        (30, "medium"),
        (29, "hard"),
        (24, "hard"),
        (17, "hard"),
    ]:
        assert sudoku.difficulty_of(with_blanks(SOLVED, blanks[: 81 - givens])) == expected, givens


# ------------------------------------------------------------------------------------------------------------ solver


def test_solves_hard_puzzle_quickly() -> None:
    start = time.perf_counter()
    assert sudoku.solve(HARD) == HARD_SOLUTION
    elapsed = time.perf_counter() - start
    assert sudoku.count_solutions(HARD) == 1
    # Typically ~3 ms; the bound only catches a search that lost its pruning (plain backtracking takes seconds).
    assert elapsed < 0.5


def test_solves_all_generated_puzzles_to_their_solution() -> None:
    for seed in range(5):
        puzzle, solution = sudoku.generate(26, seed)
        assert sudoku.solve(puzzle) == solution


def test_unsolvable_puzzles() -> None:
    # Consistent givens, no solution: row 0 holds 1-8 so cell 8 must be 9, but column 8 already has a 9.
    dead_cell = "12345678." + "........9" + "." * 63
    assert sudoku.violations(dead_cell) == set()
    assert sudoku.solve(dead_cell) is None
    assert sudoku.count_solutions(dead_cell) == 0
    # Subtler: every cell has candidates, but row 0 has no place left for a 9: cells 4 and 5 see the 9s in their
    # columns (cells 31 and 59), cells 6-8 the 9 in their box (cell 16).
    board = "1234....." + "." * 72
    for cell in (16, 31, 59):
        board = with_digit(board, cell, "9")
    assert sudoku.violations(board) == set()
    assert sudoku.count_solutions(board) == 0
    assert sudoku.solve(board) is None
    # Clashing givens: no solution, and no crash. A full board with a repeat has no cell left to search, so only the
    # givens check can reject it.
    repeat = with_digit(SOLVED, 1, SOLVED[0])
    assert sudoku.solve(repeat) is None
    assert sudoku.count_solutions(repeat) == 0
    clash = with_digit(HARD, 1, "4")
    assert sudoku.solve(clash) is None
    assert sudoku.count_solutions(clash) == 0


def test_count_solutions_counts_and_respects_limit() -> None:
    # Blank a "deadly rectangle": two rows x two columns in two boxes holding a,b / b,a. Exactly two solutions.
    cells = _deadly_rectangle(SOLVED)
    puzzle = with_blanks(SOLVED, cells)
    assert sudoku.count_solutions(puzzle) == 2
    assert sudoku.count_solutions(puzzle, limit=10) == 2
    assert sudoku.count_solutions(puzzle, limit=1) == 1
    assert sudoku.solve(puzzle) in {SOLVED, _swap_rectangle(SOLVED, cells)}
    assert sudoku.count_solutions(SOLVED) == 1
    assert sudoku.count_solutions("." * 81, limit=7) == 7
    with pytest.raises(ValueError):
        sudoku.count_solutions(HARD, limit=0)


def _deadly_rectangle(board: str) -> list[int]:
    """Four cells (r1,c1) (r1,c2) (r2,c1) (r2,c2) in exactly two boxes with board values a b / b a."""
    for r1 in range(9):
        for r2 in range(r1 + 1, 9):
            if r1 // 3 != r2 // 3:
                continue  # same band, so the rectangle spans two boxes, not four
            for c1 in range(9):
                for c2 in range(c1 + 1, 9):
                    if c1 // 3 == c2 // 3:
                        continue
                    a, b = board[r1 * 9 + c1], board[r1 * 9 + c2]
                    if board[r2 * 9 + c1] == b and board[r2 * 9 + c2] == a:
                        return [r1 * 9 + c1, r1 * 9 + c2, r2 * 9 + c1, r2 * 9 + c2]
    raise AssertionError("no deadly rectangle in this grid")


def _swap_rectangle(board: str, cells: list[int]) -> str:
    out = list(board)
    a, b, c, d = cells
    out[a], out[b], out[c], out[d] = board[b], board[a], board[d], board[c]
    return "".join(out)


# --------------------------------------------------------------------------------------------------------- generator


def check_pair(puzzle: str, solution: str, givens: int) -> None:
    assert len(puzzle) == len(solution) == 81
    assert givens_of(puzzle) == givens
    assert "." not in solution and sudoku.violations(solution) == set()
    assert all(p in (".", s) for p, s in zip(puzzle, solution))  # every given agrees with the solution
    assert sudoku.is_valid_solution(puzzle, solution)
    assert sudoku.count_solutions(puzzle) == 1


@pytest.mark.parametrize("givens", [24, 27, 33, 45, 60, 81])
def test_generate_unique_with_exact_givens(givens: int) -> None:
    puzzle, solution = sudoku.generate(givens, givens)
    check_pair(puzzle, solution, givens)


def test_generate_is_deterministic_per_seed() -> None:
    a = sudoku.generate(30, 123)
    assert sudoku.generate(30, 123) == a
    assert sudoku.generate(30, random.Random(123)) == a  # an int seed means random.Random(seed)
    assert sudoku.generate(30, 124) != a
    assert sudoku.generate(30, np.random.default_rng(5)) == sudoku.generate(30, np.random.default_rng(5))
    # A shared generator advances: two calls give two different puzzles, reproducibly.
    rng = random.Random(9)
    first, second = sudoku.generate(35, rng), sudoku.generate(35, rng)
    assert first != second
    rng = random.Random(9)
    assert (sudoku.generate(35, rng), sudoku.generate(35, rng)) == (first, second)


def test_generated_grids_are_varied() -> None:
    # Different seeds must give different solution grids, not one grid with different holes.
    solutions = {sudoku.generate(50, seed)[1] for seed in range(20)}
    assert len(solutions) == 20


def test_generate_rejects_bad_arguments() -> None:
    for bad in (16, 82, -1):
        with pytest.raises(ValueError, match="between 17 and 81"):
            sudoku.generate(bad, 0)
    with pytest.raises(TypeError):
        sudoku.generate(30.0, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        sudoku.generate(30, "seed")  # type: ignore[arg-type]


def test_generate_gives_up_on_unreachable_target() -> None:
    # 17-clue puzzles exist but a random removal order essentially never reaches one.
    with pytest.raises(RuntimeError, match="17 givens from 3 random grids"):
        sudoku.generate(17, 0, max_grids=3)


@pytest.mark.parametrize("name", ["easy", "medium", "hard"])
def test_dataset_difficulty_bands(name: str) -> None:
    lo, hi = sudoku.DIFFICULTY[name]
    data = sudoku.generate_dataset(12, name, seed=1)
    assert len(data) == 12
    counts = [givens_of(p) for p, _ in data]
    assert all(lo <= n <= hi for n in counts)
    assert len(set(counts)) > 1  # drawn from the band, not a fixed count
    for puzzle, solution in data:
        check_pair(puzzle, solution, givens_of(puzzle))
        assert sudoku.difficulty_of(puzzle) == name
    assert len({p for p, _ in data}) == 12


def test_difficulty_bands_match_the_spec() -> None:
    assert dict(sudoku.DIFFICULTY) == {"easy": (40, 50), "medium": (30, 39), "hard": (24, 29)}
    assert sudoku.DIFFICULTY["hard"][1] < 30


def test_dataset_with_explicit_range_and_errors() -> None:
    data = sudoku.generate_dataset(5, (35, 35), seed=3)
    assert [givens_of(p) for p, _ in data] == [35] * 5
    assert sudoku.generate_dataset(0, "easy", seed=0) == []
    for bad in ("extreme", (30, 20), (10, 20), (30,), (30, None), 35):
        with pytest.raises(ValueError):
            sudoku.generate_dataset(2, bad, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sudoku.generate_dataset(2, "easy", seed=-1)
    with pytest.raises(ValueError):
        sudoku.generate_dataset(2, "easy", seed=0, workers=0)


def test_dataset_is_deterministic_and_independent_of_workers() -> None:
    one = sudoku.generate_dataset(16, "medium", seed=7)
    assert sudoku.generate_dataset(16, "medium", seed=7) == one
    assert sudoku.generate_dataset(16, "medium", seed=8) != one
    assert sudoku.generate_dataset(16, "medium", seed=7, workers=2) == one
    # A prefix of a longer dataset is the shorter dataset: item i depends on (seed, i) only.
    assert sudoku.generate_dataset(20, "medium", seed=7)[:16] == one


def test_held_out_sets_by_difficulty_or_givens() -> None:
    from dgemma.tasks.sudoku.task import HELD_OUT_SEED, held_out_puzzles, puzzle_band

    assert held_out_puzzles("medium", 3) == sudoku.generate_dataset(3, "medium", seed=HELD_OUT_SEED + 1)
    fifty = held_out_puzzles("50", 3)
    assert [givens_of(p) for p, _ in fifty] == [50] * 3
    assert fifty == sudoku.generate_dataset(3, (50, 50), seed=HELD_OUT_SEED + 150)
    assert held_out_puzzles(55, 2) == held_out_puzzles("55", 2)
    for bad, fragment in (("extreme", "unknown difficulty"), ("12", "17 to 80"), ("81", "17 to 80")):
        with pytest.raises(ValueError, match=fragment):
            puzzle_band(bad)
    with pytest.raises(ValueError, match="uses for training"):
        held_out_puzzles("easy", 1, seed=0)


def test_symmetries_map_puzzles_to_equivalent_puzzles_and_back():
    from dgemma.tasks.sudoku.task import puzzle_views

    pairs = sudoku.generate_dataset(6, "hard", seed=17)
    rng = np.random.default_rng(5)
    for puzzle, solution in pairs:
        sym = sudoku.random_symmetry(rng)
        p, s = sym.apply(puzzle), sym.apply(solution)
        assert p != puzzle and p.count(".") == puzzle.count(".")
        assert sudoku.is_valid_solution(p, s) and sudoku.solve(p) == s  # still unique, with the mapped solution
        assert sym.undo(p) == puzzle and sym.undo(s) == solution
        assert sym.undo(s[:40] + "x" * 41).count(".") == 41  # cells that hold no digit come back blank
        assert sudoku.IDENTITY.apply(puzzle) == puzzle
    views = puzzle_views(5, seed=3)
    assert len(views) == 5 and views[0] == sudoku.IDENTITY and len(set(views)) == 5
    assert views == puzzle_views(5, seed=3) and views != puzzle_views(5, seed=4)
