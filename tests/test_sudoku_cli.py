"""`dgemma sudoku solve` and `dgemma generate` on a Sudoku model: output formats, the Sudoku-solver message for a text
prompt, and one-line errors. The model here is a tiny untrained one of the Sudoku vocabulary (solving is the
benchmark's business, bench/bench_sudoku.py): these tests check the plumbing, which must report unsolved boards
honestly."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from dgemma.cli import main
from dgemma.tasks.sudoku.puzzles import format_grid, generate_dataset, parse

PUZZLES = [p for p, _ in generate_dataset(3, "easy", seed=31)]


@pytest.fixture(scope="module")
def sudoku_ckpt(tmp_path_factory):
    from dgemma.backends.cuda.train import export_hf, new_model
    from dgemma.tasks.sudoku.task import sudoku_generation_config, sudoku_model_config, write_tokenizer

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
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:  # a board (digits or '.' where the model left none), an unsolved one marked as a comment
        board, _, note = line.partition("  # ")
        assert len(parse(board)) == 81 and (note == "" or note.startswith("NOT solved ("))
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


@pytest.mark.slow
def test_generate_on_a_sudoku_model_prints_the_board(sudoku_ckpt):
    out = subprocess.run([sys.executable, "-m", "dgemma.cli", "generate", "--model", str(sudoku_ckpt),
                          "--prompt", PUZZLES[0], "--seed", "0"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    if lines[0].startswith("# NOT solved ("):  # an unsolved board says so above the grid
        lines = lines[1:]
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


def test_sudoku_checkpoints_declare_their_task_and_older_ones_are_still_read(sudoku_ckpt, tmp_path):
    from dgemma.checkpoint import Checkpoint
    from dgemma.tasks import declared_task

    assert json.loads((sudoku_ckpt / "config.json").read_text())["dgemma_task"] == "sudoku"
    assert declared_task(Checkpoint(sudoku_ckpt)) == "sudoku"
    old = tmp_path / "old"  # a checkpoint written before the key existed: recognised by its Sudoku tokenizer
    shutil.copytree(sudoku_ckpt, old)
    cfg = json.loads((old / "config.json").read_text())
    del cfg["dgemma_task"]
    (old / "config.json").write_text(json.dumps(cfg))
    assert declared_task(Checkpoint(old)) == "sudoku"
    r = run_cli("sudoku", "solve", "--model", str(old), PUZZLES[0], "--no-stats")
    assert r.exit_code == 0, r.stderr
    cfg["dgemma_task"] = "chess"
    (old / "config.json").write_text(json.dumps(cfg))
    one_line_error(run_cli("generate", "--model", str(old), "--prompt", PUZZLES[0]), "config.json", "'chess'",
                   "sudoku")


@pytest.mark.parametrize("option, fragment", [(["--stream"], "--show-canvas draws it"), (["--chat"], "no chat"),
                                              (["--max-new-tokens", "9"], "82 tokens")])
def test_generate_refuses_text_options_on_a_sudoku_model(sudoku_ckpt, option, fragment):
    one_line_error(run_cli("generate", "--model", str(sudoku_ckpt), "--prompt", PUZZLES[0], *option),
                   option[0], "Sudoku" if option[0] == "--chat" else "one canvas", fragment)


def test_generate_json_on_a_sudoku_model_has_the_schema_help_promises(sudoku_ckpt):
    r = run_cli("generate", "--model", str(sudoku_ckpt), "--prompt", PUZZLES[0], "--prompt", PUZZLES[1], "--json",
                "--seed", "2")
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2
    for row, puzzle in zip(rows, PUZZLES):
        assert set(row) >= {"text", "token_ids", "finish_reason", "tokens_per_forward", "steps_per_canvas",
                            "decoder_passes", "prompt_tokens", "generated_tokens", "seconds", "puzzle", "solved"}
        assert row["puzzle"] == puzzle and row["text"] == row["solution"] and row["prompt_tokens"] == 164
        assert sum(row["steps_per_canvas"]) == row["steps"]
        board = "".join(str(t - 5) if 6 <= t <= 14 else "." for t in row["token_ids"][:81])
        assert board == row["solution"]  # the kept view's tokens, mapped back to the puzzle's own frame


def test_show_canvas_draws_the_board_and_prints_the_same_result(sudoku_ckpt):
    args = ["generate", "--model", str(sudoku_ckpt), "--prompt", PUZZLES[0], "--seed", "1", "--no-stats"]
    live = run_cli(*args, "--show-canvas")
    assert live.exit_code == 0, live.stderr
    assert "passes" in live.stderr and "------+-------+------" in live.stderr  # the board, drawn on stderr
    assert live.stdout == run_cli(*args).stdout


def test_an_unsolved_board_prints_differently(sudoku_ckpt):
    m = ["--model", str(sudoku_ckpt), "--no-constraints", "--steps", "1", "--no-stats"]  # an untrained model, 1 step
    rows = [json.loads(x) for x in run_cli("sudoku", "solve", *m, "--json", *PUZZLES).stdout.splitlines()]
    assert not any(row["solved"] for row in rows), "the test needs unsolved boards"
    lines = run_cli("sudoku", "solve", *m, *PUZZLES).stdout.splitlines()
    assert [ln.split("  # ")[0] for ln in lines] == [row["solution"] for row in rows]
    assert all(ln.split("  # ")[1].startswith("NOT solved (") for ln in lines)
    grid = run_cli("sudoku", "solve", *m, "--grid", PUZZLES[0]).stdout.splitlines()
    assert grid[0].startswith("# NOT solved (") and len(grid) == 12


def test_solve_shows_a_progress_bar_on_stderr(sudoku_ckpt, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n".join(PUZZLES) + "\n")
    m = ["--model", str(sudoku_ckpt), "--file", str(f), "--steps", "1", "--batch-size", "1", "--no-stats",
         "--no-constraints"]
    bar = run_cli("sudoku", "solve", *m, "--progress")
    assert bar.exit_code == 0, bar.stderr
    assert "solving" in bar.stderr and "3/3" in bar.stderr and "puzzle" in bar.stderr
    assert run_cli("sudoku", "solve", *m).stderr == ""  # not a terminal: no bar unless asked


def test_text_prompts_to_a_sudoku_model_are_refused_by_the_task_hook():
    """`dgemma.tasks.sudoku.check_prompt` is what the API and the CLI call before a Sudoku model sees a prompt."""
    from dgemma.errors import InputError
    from dgemma.tasks.sudoku import check_prompt
    from dgemma.tasks.sudoku.task import encode_prompt

    with pytest.raises(InputError, match="is a Sudoku solver: pass an 81-character puzzle"):
        check_prompt("Why is the sky blue?")
    with pytest.raises(InputError, match="chat messages"):
        check_prompt([{"role": "user", "content": PUZZLES[0]}])
    check_prompt(PUZZLES[0])
    check_prompt(encode_prompt(PUZZLES[0]))  # token ids are the caller's business


def test_the_api_hook_refuses_text_for_a_sudoku_checkpoint_only(sudoku_ckpt, random_default):
    """`dgemma.tasks.check_prompt(checkpoint, prompt)`: the one call `Model.encode_prompt` makes."""
    from dgemma.checkpoint import Checkpoint
    from dgemma.errors import InputError
    from dgemma.tasks import check_prompt

    sudoku = Checkpoint(sudoku_ckpt)
    with pytest.raises(InputError, match="this model is a Sudoku solver"):
        check_prompt(sudoku, "Why is the sky blue?")
    check_prompt(sudoku, PUZZLES[0])
    check_prompt(Checkpoint(random_default), "Why is the sky blue?")  # a text model takes any text


def test_request_checker_is_the_puzzles_checker():
    from dgemma.tasks.sudoku import request_checker
    from dgemma.tasks.sudoku.task import DIGIT_IDS, encode_prompt, encode_target, make_checker

    puzzle, solution = generate_dataset(1, "easy", seed=5)[0]
    canvas = np.array(encode_target(solution))
    canvas[[0, 1]] = canvas[[1, 0]]  # two swapped cells break rules (and a given, where there is one)
    canvas[2] = DIGIT_IDS[0] if canvas[2] != DIGIT_IDS[0] else DIGIT_IDS[1]
    want = make_checker([puzzle])(0, canvas)
    assert want.any()
    assert (request_checker(None, encode_prompt(puzzle))(0, canvas) == want).all()
