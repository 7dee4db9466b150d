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
from dgemma.tasks.sudoku.puzzles import is_valid_solution, parse
from dgemma.tasks.sudoku.task import held_out_puzzles

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


@pytest.mark.slow
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


def test_stream_handles_several_prompts_and_prints_stats(random_default):
    m = ["generate", "--model", str(random_default), "--prompt", "abc", "--prompt", "de", "--max-new-tokens", "40",
         "--steps", "3", "--seed", "1"]
    r = run_cli(*m, "--stream")
    assert r.exit_code == 0, r.stderr
    one = [run_cli("generate", "--model", str(random_default), "--prompt", p, "--max-new-tokens", "40", "--steps",
                   "3", "--seed", str(s), "--no-stats").stdout for p, s in (("abc", 1), ("de", 2))]
    assert r.stdout == "".join(one)  # prompt i streams with seed + i, as a batch would seed it
    stats = r.stderr.splitlines()
    assert len(stats) == 2 and all("tokens" in ln and "steps per canvas" in ln for ln in stats), r.stderr
    one_line_error(run_cli(*m, "--stream", "--json"), "--stream", "--json")


def test_a_missing_tokenizer_names_the_folder(random_default, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(random_default, bare)
    (bare / "tokenizer.json").unlink()
    one_line_error(run_cli("generate", "--model", str(bare), "--prompt", "x"), str(bare), "no tokenizer.json")


def test_default_model_routes_text_to_the_shipped_text_model(random_default, monkeypatch):
    import dgemma.assets

    monkeypatch.setattr(dgemma.assets, "TEXT_MODEL", random_default)  # as if dgemma/assets/text had shipped
    r = run_cli("generate", "--prompt", "Why is the sky blue?", "--max-new-tokens", "8", "--steps", "2")
    assert r.exit_code == 0, r.stderr
    assert "Sudoku" not in r.stderr and "tokens/forward" in r.stderr
    board = run_cli("generate", "--prompt", README_PUZZLE, "--seed", "0")  # a puzzle still goes to the Sudoku model
    assert board.exit_code == 0 and "solved 1/1" in board.stderr, board.stderr
    assert is_valid_solution(README_PUZZLE, "".join(ch for ch in board.stdout if ch.isdigit()))


def _options(command, path=()):
    import click

    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _options(sub, (*path, name))
    else:
        for p in command.params:
            if isinstance(p, click.Option):
                yield " ".join(path), p


def test_every_option_has_help_and_none_is_stale():
    missing = [f"{cmd} {p.opts[0]}" for cmd, p in _options(main) if not (p.help or "").strip()]
    assert not missing, missing
    help_text = run_cli("generate", "--help").stdout
    assert "until a trained one ships" not in help_text and "retries" in run_cli("sudoku", "solve", "--help").stdout


def test_random_checkpoint_command(tmp_path):
    folder = tmp_path / "rnd"
    r = run_cli("random-checkpoint", str(folder), "--seed", "3")
    assert r.exit_code == 0, r.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in folder.iterdir()}
    out = run_cli("generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "8", "--steps", "2")
    assert out.exit_code == 0, out.stderr
    one_line_error(run_cli("random-checkpoint", str(folder)), str(folder), "--force")
    assert run_cli("random-checkpoint", str(folder), "--force").exit_code == 0


@pytest.mark.parametrize("port", ["99999", "0"])
def test_serve_port_out_of_range_is_one_line(port):
    one_line_error(run_cli("serve", "--port", port), "--port", "65535")


def test_serve_port_in_use_is_one_line():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        one_line_error(run_cli("serve", "--port", str(port)), f"--port {port}", "cannot listen", "another --port")


@pytest.mark.parametrize("args, module", [(["serve"], "fastapi"),
                                          (["generate", "--prompt", "x", "--show-canvas"], "rich")])
def test_the_serve_extra_missing_is_one_line(random_default, monkeypatch, args, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    one_line_error(run_cli(*args, "--model", str(random_default)), module, "pip install 'dgemma[serve]'")


def test_convert_of_a_hub_id_offline_fails_at_once(monkeypatch):
    import time

    from huggingface_hub import constants

    import dgemma.checkpoint

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    dgemma.checkpoint.hub_offline.cache_clear()
    try:
        started = time.perf_counter()
        one_line_error(run_cli("convert", "dgemma-tests/not-in-any-cache", "--to", "mlx", "--bits", "4",
                               "--dry-run"), "dgemma-tests/not-in-any-cache", "not in the local Hugging Face cache")
        assert time.perf_counter() - started < 5
        one_line_error(run_cli("generate", "--model", "dgemma-tests/not-in-any-cache", "--prompt", "x"),
                       "not in the local Hugging Face cache")
    finally:
        dgemma.checkpoint.hub_offline.cache_clear()


def test_convert_prints_its_report_once(random_default, tmp_path):
    r = run_cli("convert", str(random_default), str(tmp_path / "out"), "--to", "hf", "--progress")
    assert r.exit_code == 0, r.stderr
    first = r.stdout.strip().splitlines()[0]
    assert r.stdout.count(first) == 1, r.stdout


def test_fp8_checkpoint_on_mlx_says_what_it_is(random_default, tmp_path):
    pytest.importorskip("mlx.core")
    fp8 = tmp_path / "fp8"
    assert run_cli("convert", str(random_default), str(fp8), "--to", "cuda", "--quant", "fp8",
                   "--no-progress").exit_code == 0
    one_line_error(run_cli("generate", "--model", str(fp8), "--backend", "mlx", "--prompt", "x"),
                   "FP8/int4 checkpoint", "--backend cuda", "--to mlx")
