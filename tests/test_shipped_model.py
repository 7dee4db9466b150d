"""The Sudoku model shipped inside the package (dgemma/assets/sudoku): it is the default, it is small, it loads on both
backends with the same logits, and it solves a fixed handful of held-out puzzles on each (`dgemma generate` with no
--model on one of them: tests/test_cli.py). How well it solves in general is the benchmark's business
(bench/bench_sudoku.py); the puzzles here are ones it solved when it was shipped, so a change that breaks the model,
its loading or the sampler shows up as a failure."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import dgemma
from dgemma.assets import PACKAGED_MODEL, default_model_path
from dgemma.cli import main
from dgemma.tasks.sudoku.puzzles import is_valid_solution
from dgemma.tasks.sudoku.task import encode_prompt, held_out_puzzles, is_sudoku_model, solve_puzzles

# Held-out puzzles with 55 givens (never seen in training) that the shipped model solved on both backends at sampling
# seed 0 + i with constraint-aware sampling and 2 retries. The first is the README's main command
# (tests/test_cli.py runs that one through `dgemma generate` with no --model).
PUZZLES = [p for p, _ in held_out_puzzles("55", 4)]


@pytest.fixture(scope="module")
def models():
    return {b: dgemma.load(PACKAGED_MODEL, backend=b) for b in ("cuda", "mlx")}


def test_the_default_model_is_the_shipped_sudoku_model():
    assert default_model_path() == PACKAGED_MODEL
    files = {p.name for p in PACKAGED_MODEL.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "TRAINING.md"} <= files
    size = sum(p.stat().st_size for p in PACKAGED_MODEL.iterdir())
    assert size < 20 * 2**20, f"the shipped model is {size / 2**20:.1f} MiB"
    assert "examples/sudoku/train.py" in (PACKAGED_MODEL / "TRAINING.md").read_text()


def test_both_backends_give_the_same_logits(models):
    puzzle = held_out_puzzles("medium", 1)[0][0]
    prompt = np.array([encode_prompt(puzzle)])
    canvas = np.random.default_rng(0).integers(0, 128, size=(1, 82))
    logits = {}
    for name, model in models.items():
        assert is_sudoku_model(model)
        logits[name] = np.asarray(model.denoise(model.prefill(prompt), canvas), dtype=np.float64)
    diff = np.abs(logits["cuda"] - logits["mlx"]).max()
    assert diff < 2e-3, diff
    assert (logits["cuda"].argmax(-1) == logits["mlx"].argmax(-1)).mean() > 0.99


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
@pytest.mark.slow
def test_solves_held_out_puzzles(models, backend):
    results = solve_puzzles(models[backend], PUZZLES, seed=0, constraints=True, max_retries=2)
    for r in results:
        assert r.solved and is_valid_solution(r.puzzle, r.solution), (r.puzzle, r.solution)
        assert r.steps >= 1


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
@pytest.mark.slow
def test_parallel_attempts_solve_what_one_attempt_does_not(models, backend):
    """Held-out medium puzzles: with 8 symmetric views side by side the shipped model solves all of these, in fewer
    passes than one attempt takes on those it fails (they run to the step limit)."""
    puzzles = [p for p, _ in held_out_puzzles("medium", 6)]
    one = solve_puzzles(models[backend], puzzles, seed=0, max_retries=0)
    eight = solve_puzzles(models[backend], puzzles, seed=0, max_retries=0, attempts=8)
    assert all(r.solved and r.attempts == 8 for r in eight), [r.steps for r in eight]
    assert not all(r.solved for r in one), "one attempt solves them all: the test would prove nothing"
    assert sum(r.steps for r in eight) < sum(r.steps for r in one)


def test_a_text_prompt_to_the_sudoku_model_is_one_line():
    from dgemma.assets import default_model_path

    r = CliRunner().invoke(main, ["generate", "--model", str(default_model_path()), "--prompt", "Why is the sky blue?"],
                           catch_exceptions=False)
    assert r.exit_code == 2, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --model") and "is a Sudoku solver" in lines[0], r.stderr
    assert "--model PATH" in lines[0]


def test_a_text_prompt_without_a_model_goes_to_the_shipped_text_model():
    from dgemma.assets import text_model_path

    if text_model_path() is None:
        pytest.skip("no text model ships in this package")
    r = CliRunner().invoke(main, ["generate", "--prompt", "The ", "--seed", "0", "--max-new-tokens", "64"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() and "tokens/forward" in r.stderr


def test_sudoku_solve_json_on_the_built_in_model():
    puzzles = PUZZLES[:2]
    r = CliRunner().invoke(main, ["sudoku", "solve", "--json", *puzzles], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["puzzle"] for row in rows] == puzzles
    assert all(row["solved"] for row in rows) and all(row["steps"] >= 1 for row in rows)
