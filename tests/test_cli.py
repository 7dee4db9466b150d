"""`dgemma generate` end to end, and the one-line errors it gives for bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dgemma.cli import main
from dgemma.sudoku import is_valid_solution, parse
from dgemma.sudoku_task import held_out_puzzles

README_PUZZLE = held_out_puzzles("55", 1)[0][0]


def run_cli(*args, env=None):
    runner = CliRunner()
    return runner.invoke(main, list(args), env=env, catch_exceptions=False)


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_generate_on_the_default_model_in_a_fresh_process(tmp_path):
    """The README's main command: no --model, the Sudoku model shipped in the package solves the puzzle."""
    env = dict(os.environ, DGEMMA_CACHE=str(tmp_path / "cache"))
    puzzle = README_PUZZLE
    cmd = [sys.executable, "-m", "dgemma.cli", "generate", "--prompt", puzzle, "--seed", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "solved 1/1" in out.stderr and "tokens/forward" in out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 11 and lines[3] == "------+-------+------"
    board = "".join(ch for ln in lines for ch in ln if ch.isdigit())
    assert is_valid_solution(parse(puzzle), board)
    assert not (tmp_path / "cache").exists()  # the shipped model is read in place: no random model is written
    again = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert again.stdout == out.stdout  # same seed, same board


def test_readme_main_command_uses_this_puzzle():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f'dgemma generate --prompt "{README_PUZZLE}"' in readme


def test_json_batch_and_chat(random_default):
    r = run_cli("generate", "--model", str(random_default), "--prompt", "one", "--prompt", "two words",
                "--max-new-tokens", "20", "--steps", "4", "--seed", "3", "--json", "--chat")
    assert r.exit_code == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert set(row) >= {"text", "token_ids", "tokens_per_forward", "steps_per_canvas", "finish_reason"}
        assert 0 < len(row["token_ids"]) <= 20 or row["finish_reason"] == "eos"
        assert all(1 <= s <= 4 for s in row["steps_per_canvas"])


def test_stream_prints_text(random_default):
    r = run_cli("generate", "--model", str(random_default), "--prompt", "abc", "--max-new-tokens", "40",
                "--steps", "3", "--seed", "1", "--stream")
    assert r.exit_code == 0, r.stderr
    full = run_cli("generate", "--model", str(random_default), "--prompt", "abc", "--max-new-tokens", "40",
                   "--steps", "3", "--seed", "1", "--no-stats")
    assert r.stdout == full.stdout


def test_unknown_backend(random_default):
    one_line_error(run_cli("generate", "--model", str(random_default), "--prompt", "x", "--backend", "tpu"),
                   "unknown backend 'tpu'", "cuda", "mlx")


def test_mlx_backend_missing(random_default, monkeypatch):
    for name in list(sys.modules):
        if name == "mlx" or name.startswith(("mlx.", "dgemma.backends.mlx")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlx", None)  # makes `import mlx...` fail as if it were not installed
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    one_line_error(run_cli("generate", "--model", str(random_default), "--prompt", "x", "--backend", "mlx"),
                   "backend 'mlx' needs", "pip install")


@pytest.mark.parametrize("args, fragment", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "   "], "--prompt is empty"),
    ([], "no prompt"),
    (["--prompt", "x", "--steps", "-2"], "max_denoising_steps must be a positive integer"),
    (["--prompt", "x", "--t-min", "0.9", "--t-max", "0.5"], "t_min (0.9) must not exceed t_max (0.5)"),
    (["--prompt", "x", "--entropy-bound", "-1"], "entropy_bound must be a number > 0"),
    (["--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["--prompt", "x", "--max-new-tokens", "5000"], "the model has 4096"),
    (["--prompt", "x", "--dtype", "int3"], "--dtype 'int3' is not supported"),
    (["--prompt-file", "/nonexistent/prompts.txt"], "--prompt-file /nonexistent/prompts.txt"),
])
def test_bad_input_gives_one_line(random_default, args, fragment):
    one_line_error(run_cli("generate", "--model", str(random_default), *args), fragment)


def test_prompt_longer_than_positions(random_default, tmp_path):
    f = tmp_path / "long.txt"
    f.write_text("a" * 4100 + "\n")
    one_line_error(run_cli("generate", "--model", str(random_default), "--prompt-file", str(f)),
                   "prompt of 4101 tokens", "the model has 4096")


def test_bad_checkpoints(random_default, tmp_path):
    one_line_error(run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "x"), "no such model folder")
    other = tmp_path / "other"
    shutil.copytree(random_default, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["model_type"] = "gemma3"
    (other / "config.json").write_text(json.dumps(cfg))
    one_line_error(run_cli("generate", "--model", str(other), "--prompt", "x"), "model_type is 'gemma3'")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(random_default, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(run_cli("generate", "--model", str(corrupt), "--prompt", "x"), "model.safetensors",
                   "not a valid safetensors file")
    wrong_shape = tmp_path / "wrong_shape"
    shutil.copytree(random_default, wrong_shape)
    cfg = json.loads((wrong_shape / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 100
    (wrong_shape / "config.json").write_text(json.dumps(cfg))
    one_line_error(run_cli("generate", "--model", str(wrong_shape), "--prompt", "x"), "has shape", "config implies")
    no_config = tmp_path / "no_config"
    shutil.copytree(random_default, no_config)
    (no_config / "config.json").unlink()
    one_line_error(run_cli("generate", "--model", str(no_config), "--prompt", "x"), "no config.json")


def test_out_of_vocabulary_ids_rejected(random_default):
    import dgemma
    from dgemma.errors import InputError

    model = dgemma.load(random_default, backend="cuda")
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.generate([5, 6, 100000], max_new_tokens=8)
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.prefill([[5, -1]])
