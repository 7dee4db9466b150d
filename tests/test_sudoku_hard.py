"""Hard Sudoku puzzles (dgemma.tasks.sudoku.minimal): fewer than 27 givens, exactly one solution, minimal when asked,
deterministic per seed; the "minimal" held-out difficulty; and the accelerator training command on a few CPU steps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dgemma.tasks.sudoku.minimal import (MAX_GIVENS, generate_hard, generate_hard_dataset, givens_histogram,
                                         is_minimal, removable_givens, solved_by_singles)
from dgemma.tasks.sudoku.puzzles import count_solutions, is_valid_solution, solve
from dgemma.tasks.sudoku.task import HELD_OUT_SEED, held_out_puzzles, parse_difficulties

ROOT = Path(__file__).resolve().parents[1]


def givens(puzzle: str) -> int:
    return 81 - puzzle.count(".")


def minimal_by_brute_force(puzzle: str) -> bool:
    """The definition, with the exact solver only: unique, and every one-given-less puzzle has a second solution."""
    if count_solutions(puzzle) != 1:
        return False
    return all(count_solutions(puzzle[:i] + "." + puzzle[i + 1:]) == 2 for i in range(81) if puzzle[i] != ".")


@pytest.fixture(scope="module")
def dataset():
    return generate_hard_dataset(12, seed=5)


def test_dataset_puzzles_are_hard_unique_and_minimal(dataset):
    for puzzle, solution in dataset:
        assert givens(puzzle) <= MAX_GIVENS < 27
        assert count_solutions(puzzle, limit=3) == 1
        assert solve(puzzle) == solution and is_valid_solution(puzzle, solution)
    # The brute-force definition on a few (each costs one solver call per given), the fast check on all.
    assert all(minimal_by_brute_force(p) for p, _ in dataset[:3])
    assert all(is_minimal(p) for p, _ in dataset)


def test_target_count_is_exact_and_minimal_when_asked():
    for seed, target in ((1, 24), (2, 25), (3, 26)):
        near, solution = generate_hard(seed, target=target)
        assert givens(near) == target and count_solutions(near) == 1 and solve(near) == solution
        strict, _ = generate_hard(seed, target=target, minimal=True)
        assert givens(strict) == target and minimal_by_brute_force(strict)


def test_deterministic_per_seed_and_workers(dataset):
    assert generate_hard(11) == generate_hard(11)
    assert generate_hard(11) != generate_hard(12)
    assert generate_hard_dataset(12, seed=5) == dataset
    assert generate_hard_dataset(4, seed=5, workers=2) == dataset[:4]
    assert generate_hard_dataset(4, seed=6) != dataset[:4]
    banded = generate_hard_dataset(6, seed=1, targets=(24, 26))
    assert banded == generate_hard_dataset(6, seed=1, targets=(24, 26), workers=2)
    assert set(givens_histogram([p for p, _ in banded])) <= {24, 25, 26}


def test_minimality_check_catches_extra_givens_and_non_unique(dataset):
    puzzle, solution = dataset[0]
    blank = puzzle.index(".")
    extra = puzzle[:blank] + solution[blank] + puzzle[blank + 1:]  # one more given: still unique, not minimal
    assert count_solutions(extra) == 1
    assert blank in removable_givens(extra) and not is_minimal(extra)
    assert not minimal_by_brute_force(extra)
    given = next(i for i, c in enumerate(puzzle) if c != ".")
    fewer = puzzle[:given] + "." + puzzle[given + 1:]  # a minimal puzzle less a given has several solutions
    assert count_solutions(fewer) == 2 and not is_minimal(fewer)
    with pytest.raises(ValueError, match="exactly one solution"):
        removable_givens(fewer)


def test_a_17_given_puzzle_is_minimal_and_needs_a_guess():
    # Norvig's "hard1": unique with 17 givens, so minimal (no unique puzzle has 16), and singles alone stall on it.
    hard1 = "4.....8.5.3..........7......2.....6.....8.4......1.......6.3.7.5..2.....1.4......"
    assert is_minimal(hard1) and minimal_by_brute_force(hard1)
    assert not solved_by_singles(hard1)
    solution = solve(hard1)
    assert solved_by_singles(solution[:40] + "." + solution[41:])
    assert not solved_by_singles("11" + "." * 79)  # clashing givens


def test_needs_guess_keeps_puzzles_singles_cannot_solve():
    hardest = generate_hard_dataset(4, seed=9, needs_guess=True)
    assert all(not solved_by_singles(p) and is_minimal(p) and givens(p) < 27 for p, _ in hardest)
    assert generate_hard_dataset(4, seed=9) != hardest  # the same streams without the filter keep easier ones
    with pytest.raises(RuntimeError, match="needing a guess"):
        generate_hard(0, target=17, needs_guess=True, max_grids=1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="target"):
        generate_hard(0, target=16)
    with pytest.raises(ValueError, match="at most max_givens"):
        generate_hard(0, target=26, max_givens=24)
    with pytest.raises(TypeError):
        generate_hard(0, target=24.0)
    with pytest.raises(RuntimeError, match="17 givens from 2 random grids"):
        generate_hard(0, target=17, max_grids=2)
    with pytest.raises(ValueError, match="targets"):
        generate_hard_dataset(2, targets=(25, 30))
    with pytest.raises(ValueError, match="seed"):
        generate_hard_dataset(2, seed=-1)


def test_minimal_is_a_held_out_difficulty():
    assert parse_difficulties("medium,minimal") == ["medium", "minimal"]
    held = held_out_puzzles("minimal", 3)
    assert held == generate_hard_dataset(3, seed=HELD_OUT_SEED + 3)
    assert all(givens(p) < 27 for p, _ in held)
    # Not the pools examples/sudoku/train.py draws its minimal puzzles from (seed + 3 for seeds 0..10).
    assert not set(held) & set(generate_hard_dataset(3, seed=3))


@pytest.mark.slow
def test_gpu_training_command_runs_a_few_cpu_steps(tmp_path):
    """examples/sudoku/train_gpu.sh (bf16 autocast, four-pool curriculum ending on minimal puzzles, --max-minutes)
    with a tiny model on the CPU: it trains, exports a loadable checkpoint and logs every step."""
    out = tmp_path / "run"
    cmd = ["bash", str(ROOT / "examples/sudoku/train_gpu.sh"), str(out), "--device", "cpu", "--hidden", "32",
           "--layers", "2", "--batch", "4", "--steps", "3", "--pool", "12,12,12,6", "--eval-size", "4",
           "--solve-eval", "0", "--eval-every", "2", "--save-every", "2", "--threads", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "6 minimal puzzles" in run.stderr
    final = json.loads(run.stdout.strip().splitlines()[-1])
    assert final["step"] == 3
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3] and all(e["loss"] > 0 for e in log)
    import dgemma

    model = dgemma.load(out, backend="cuda", device="cpu")
    assert model.config.canvas_length == 82


@pytest.mark.slow
def test_max_minutes_stops_and_exports(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "examples/sudoku/train.py"), "--out", str(out), "--hidden", "32", "--layers",
           "2", "--batch", "4", "--steps", "1000", "--pool", "8,8,8,4", "--mix", "1,1,1,1:0,0,1,1", "--eval-size",
           "2", "--max-minutes", "0.0001", "--threads", "1", "--no-progress", "--device", "cpu"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "stopped before step" in run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1])["step"] < 1000
    assert (out / "model.safetensors").exists() and (out / "train_state.pt").exists()
