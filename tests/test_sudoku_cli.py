"""`dgemma sudoku solve` and `dgemma generate` on a Sudoku model: output formats, the Sudoku-solver message for a text
prompt, and one-line errors. The model here is a tiny untrained one of the Sudoku vocabulary (solving is the
benchmark's business, bench/bench_sudoku.py): these tests check the plumbing, which must report unsolved boards
honestly."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dgemma.cli import main
from dgemma.sudoku import format_grid, generate_dataset, parse

PUZZLES = [p for p, _ in generate_dataset(3, "easy", seed=31)]


@pytest.fixture(scope="module")
def sudoku_ckpt(tmp_path_factory):
    from dgemma.backends.cuda.train import export_hf, new_model
    from dgemma.sudoku_task import sudoku_generation_config, sudoku_model_config, write_tokenizer

    config = sudoku_model_config(hidden_size=32, num_hidden_layers=2, num_experts=4, moe_intermediate_size=16,
                                 intermediate_size=64, num_attention_heads=2, head_dim=16)
    folder = tmp_path_factory.mktemp("sudoku") / "model"
    return export_hf(new_model(config, seed=0), folder, config, sudoku_generation_config(max_denoising_steps=4),
                     write_tokenizer)


def run_cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_solve_prints_one_board_per_puzzle_and_a_summary(sudoku_ckpt):
    r = run_cli("sudoku", "solve", "--model", str(sudoku_ckpt), *PUZZLES[:2], "--retries", "1")
    assert r.exit_code == 0, r.stderr
    boards = r.stdout.split()
    assert len(boards) == 2 and all(len(b) == 81 for b in boards)
    for puzzle, board in zip(PUZZLES, boards):
        parse(board)  # a board, digits or '.' where the model left none
    assert "solved " in r.stderr and "/2" in r.stderr and "denoising steps" in r.stderr


def test_solve_json_and_file(sudoku_ckpt, tmp_path):
    f = tmp_path / "puzzles.txt"
    f.write_text("# three puzzles, one as 'puzzle,solution'\n" + PUZZLES[0] + "\n\n"
                 + PUZZLES[1].replace(".", "0") + ",whatever\n" + format_grid(PUZZLES[2]).replace("\n", " ")
                 .replace("|", "").replace("-", "").replace("+", "") + "\n")
    r = run_cli("sudoku", "solve", "--model", str(sudoku_ckpt), "--file", str(f), "--json", "--no-stats",
                "--no-constraints", "--steps", "3")
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["puzzle"] for row in rows] == PUZZLES
    for row in rows:
        assert set(row) >= {"puzzle", "solution", "solved", "steps"}
        assert isinstance(row["solved"], bool) and len(row["solution"]) == 81
        assert 1 <= row["steps"] <= 3  # --no-constraints: no retries, at most --steps passes


def test_generate_on_a_sudoku_model_prints_the_board(sudoku_ckpt):
    out = subprocess.run([sys.executable, "-m", "dgemma.cli", "generate", "--model", str(sudoku_ckpt),
                          "--prompt", PUZZLES[0], "--seed", "0"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 11 and lines[3] == "------+-------+------"
    assert "solved " in out.stderr and "/1" in out.stderr


def test_a_text_prompt_to_a_sudoku_model_says_it_is_a_sudoku_solver(sudoku_ckpt):
    one_line_error(run_cli("generate", "--model", str(sudoku_ckpt), "--prompt", "Why is the sky blue?"),
                   "is a Sudoku solver", "81-character puzzle", "--model PATH")


def test_solve_bad_input_is_one_line(sudoku_ckpt):
    m = ["--model", str(sudoku_ckpt)]
    one_line_error(run_cli("sudoku", "solve", *m), "no puzzle")
    one_line_error(run_cli("sudoku", "solve", *m, "12x" + "." * 78), "puzzle 1", "bad character 'x'")
    one_line_error(run_cli("sudoku", "solve", *m, PUZZLES[0], "1" * 20), "puzzle 2", "81 cells")
    one_line_error(run_cli("sudoku", "solve", *m, "11" + "." * 79), "puzzle 1", "givens break the rules", "r1c1")
    one_line_error(run_cli("sudoku", "solve", *m, "--file", "/nonexistent/p.txt"), "--file /nonexistent/p.txt")
    one_line_error(run_cli("sudoku", "solve", *m, "--steps", "0", PUZZLES[0]), "--steps")


def test_solve_refuses_a_text_model(random_default):
    one_line_error(run_cli("sudoku", "solve", "--model", str(random_default), PUZZLES[0]), "not a Sudoku model")


def test_solve_with_attempts_reports_them_and_needs_constraints(sudoku_ckpt):
    r = run_cli("sudoku", "solve", "--model", str(sudoku_ckpt), *PUZZLES[:2], "--attempts", "3", "--json",
                "--no-stats", "--retries", "0")
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["attempts"] for row in rows] == [3, 3] and all(1 <= row["steps"] <= 4 for row in rows)
    plain = run_cli("sudoku", "solve", "--model", str(sudoku_ckpt), PUZZLES[0], "--json", "--no-constraints")
    assert json.loads(plain.stdout.splitlines()[0])["attempts"] == 1
    one_line_error(run_cli("sudoku", "solve", "--model", str(sudoku_ckpt), PUZZLES[0], "--attempts", "2",
                           "--no-constraints"), "--attempts", "--constraints")
