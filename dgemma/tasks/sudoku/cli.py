"""The Sudoku task's command line: `dgemma sudoku solve`, and what `dgemma generate` does on a Sudoku model."""

from __future__ import annotations

import json
import sys

import click

from ...errors import InputError
from .puzzles import BLANK, format_grid, violations

# Parallel attempts (symmetric views) per puzzle when the CLI solves Sudoku: on the shipped model 8 views solve about
# 94% of held-out medium puzzles where one solves 58% (examples/sudoku/RUNS.md), at 8 canvases per denoising pass.
DEFAULT_ATTEMPTS = 8


def check_puzzle(text: str, name: str) -> str:
    from .task import check_puzzle as check

    try:
        return check(text, name)
    except ValueError as e:
        raise InputError(str(e)) from None


def solve(model, boards, *, seed, constraints, retries, attempts, sampler, batch_size=64, on_step=None,
          progress=False):
    from tqdm.auto import tqdm

    from .task import solve_puzzles

    # Redrawn after every batch (there are few): a throttled bar would skip what fast batches did.
    with tqdm(total=len(boards), unit="puzzle", desc="solving", file=sys.stderr, disable=not progress,
              leave=False, mininterval=0, miniters=1) as bar:
        try:
            return solve_puzzles(model, boards, seed=seed, constraints=constraints, max_retries=retries,
                                 attempts=attempts, batch_size=batch_size * attempts, on_step=on_step,
                                 on_batch=bar.update, **sampler)
        except ValueError as e:  # a bad sampler value
            raise InputError(str(e)) from None


def verdict(result) -> str:
    """'solved', or 'NOT solved' with what is wrong with the board."""
    if result.solved:
        return "solved"
    blanks = result.solution.count(BLANK)
    bad = len(violations(result.solution, result.puzzle))
    what = [f"{bad} cells break a rule"] if bad else []
    what += [f"{blanks} cells left blank"] if blanks else []
    return "NOT solved (" + ", ".join(what or ["not a solution"]) + ")"


def print_results(results, model, *, as_json: bool, grid: bool, stats: bool, generate_json: bool = False) -> None:
    """One board per puzzle on stdout (an unsolved one marked '# NOT solved ...', a comment that `--file` skips),
    and the summary line on stderr."""
    for i, r in enumerate(results):
        if as_json:
            click.echo(json.dumps(r.to_generate_json() if generate_json else r.to_json()))
        elif grid:
            if len(results) > 1 or not r.solved:
                click.echo(f"# puzzle {i + 1}: {verdict(r)}" if len(results) > 1 else f"# {verdict(r)}")
            click.echo(format_grid(r.solution))
        else:
            click.echo(r.solution if r.solved else f"{r.solution}  # {verdict(r)}")
    if stats:
        solved = sum(r.solved for r in results)
        steps = sum(r.steps for r in results) / len(results)
        tpf = sum(r.tokens_per_forward for r in results) / len(results)
        secs = sum(r.seconds for r in results)
        views = max(r.attempts for r in results)
        width = f", {views} views per puzzle side by side" if views > 1 else ""
        click.echo(f"[solved {solved}/{len(results)}, mean {steps:.1f} denoising steps per puzzle (retries included)"
                   f"{width}, tokens/forward {tpf:.2f}, {secs:.2f}s, {model.backend.describe()}]", err=True)


def run_generate(model, prompts: list[str], options) -> None:
    """`dgemma generate` on a Sudoku model: each prompt is a puzzle, solved as `dgemma sudoku solve` does (8 views,
    constraint-aware, 2 retries) and printed as a 9x9 grid; `--show-canvas` draws the board as it denoises."""
    who = options.who
    if options.chat:
        raise InputError(f"--chat: {who} is a Sudoku solver and has no chat template; pass the puzzle as --prompt")
    if options.sampler.get("max_new_tokens") is not None:
        raise InputError(f"--max-new-tokens: {who} answers with one canvas of 82 tokens (81 cells and eos); drop "
                         "the option")
    if options.stream:
        raise InputError(f"--stream: {who} answers with one canvas (the whole board); --show-canvas draws it as it "
                         "denoises")
    from . import check_prompt

    boards = []
    for i, p in enumerate(prompts):
        check_prompt(p, who=who, other="--model PATH")
        boards.append(check_puzzle(p, "--prompt" if len(prompts) == 1 else f"prompt {i + 1}"))
    sampler = {k: v for k, v in options.sampler.items() if k != "max_new_tokens"}
    seed = 0 if options.seed is None else options.seed
    kw = dict(seed=seed, constraints=True, retries=2, attempts=DEFAULT_ATTEMPTS, sampler=sampler)
    if options.show_canvas:
        results = _solve_live(model, boards, kw)
    else:
        results = solve(model, boards, **kw)
    print_results(results, model, as_json=options.as_json, grid=True, stats=options.stats, generate_json=True)


def _solve_live(model, boards, kw):
    if len(boards) != 1:
        raise InputError("--show-canvas draws one prompt at a time")
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        raise InputError("--show-canvas needs rich: pip install 'dgemma[serve]'") from None
    from .view import LiveBoard, render_board

    with Live(render_board(boards[0], BLANK * 81, None, "starting"), console=Console(stderr=True),
              auto_refresh=False) as live:
        hook = LiveBoard(live, boards[0], model.backend.ops, kw["attempts"])
        results = solve(model, boards, on_step=hook, **kw)
        hook.finish(results[0].solution, results[0].solved)
    return results


def sudoku_command() -> click.Group:
    """The `dgemma sudoku` group (built on demand: the options are shared with `dgemma generate`)."""
    from ...cli import _backend_option

    @click.group()
    def sudoku():
        """Solve Sudoku puzzles with a Sudoku model (by default the one built into dgemma)."""

    @sudoku.command("solve")
    @click.argument("puzzles", nargs=-1)
    @click.option("--file", "puzzle_file", type=click.Path(dir_okay=False),
                  help="Puzzles, one per line (81 cells; a line 'puzzle,solution' uses the first field; '#' "
                       "comments).")
    @click.option("--model", "model_path", default=None, help="A Sudoku model folder (default: the built-in one).")
    @_backend_option
    @click.option("--json", "as_json", is_flag=True, help='One {"puzzle", "solution", "solved", "steps", ...} per '
                  "line.")
    @click.option("--grid", is_flag=True, help="Print each solution as a 9x9 grid instead of one 81-char line.")
    @click.option("--constraints/--no-constraints", default=True, show_default=True,
                  help="Constraint-aware sampling: re-noise digits that break a rule or overwrite a given.")
    @click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True,
                  help="With --constraints: re-denoise a finished board that still breaks a rule, at most this "
                       "often.")
    @click.option("--attempts", type=click.IntRange(min=1), default=None,
                  help=f"With --constraints: symmetric views of each puzzle denoised side by side; the first that "
                       f"solves it wins [default: {DEFAULT_ATTEMPTS}; 1 with --no-constraints].")
    @click.option("--seed", type=int, default=0, show_default=True, help="Puzzle i uses seed + i.")
    @click.option("--steps", "max_denoising_steps", type=click.IntRange(min=1), default=None,
                  help="Maximum denoising passes over a board before it is finished (default: the model's); each "
                       "retry may take as many again, and the reported steps of a puzzle count every pass, retries "
                       "included (its views run side by side, so they share them).")
    @click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
                  help="Puzzles per batch (each attempt is one canvas of it).")
    @click.option("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's).")
    @click.option("--device", default=None, help="Torch device for --backend cuda (default: cuda if available, "
                  "else cpu).")
    @click.option("--stats/--no-stats", default=True, help="Print the solve rate and mean steps to stderr.")
    @click.option("--progress/--no-progress", default=None,
                  help="A progress bar on stderr [default: on when stderr is a terminal].")
    def solve_command(puzzles, puzzle_file, model_path, backend, as_json, grid, constraints, retries, attempts,
                      seed, max_denoising_steps, batch_size, dtype, device, stats, progress):
        """Solve PUZZLES (81 cells each: '1'-'9', '.' or '0' for blanks; whitespace ignored). One line per puzzle:
        the model's board; an unsolved one ends in '# NOT solved (...)' (--json says "solved": false)."""
        from ...api import load
        from ...assets import default_model_path
        from ...checkpoint import Checkpoint
        from .. import TASK_KEY, declared_task

        boards = _read_puzzles(puzzles, puzzle_file)
        if attempts is None:
            attempts = DEFAULT_ATTEMPTS if constraints else 1
        if attempts > 1 and not constraints:
            raise InputError("--attempts above 1 needs --constraints (the checker is what tells a solved board)")
        path = model_path if model_path is not None else default_model_path()
        checkpoint = Checkpoint(path)
        task = declared_task(checkpoint)
        if task != "sudoku":
            raise InputError(f"--model {path} is not a Sudoku model (its config.json has no "
                             f"\"{TASK_KEY}\": \"sudoku\" and its tokenizer no Sudoku cell tokens)")
        model = load(checkpoint, backend=backend, dtype=dtype, device=device, progress=False)
        results = solve(model, boards, seed=seed, constraints=constraints, retries=retries, attempts=attempts,
                        batch_size=batch_size, sampler={"max_denoising_steps": max_denoising_steps},
                        progress=sys.stderr.isatty() if progress is None else progress)
        print_results(results, model, as_json=as_json, grid=grid, stats=stats)

    return sudoku


def _read_puzzles(puzzles, puzzle_file) -> list[str]:
    boards = [check_puzzle(p, f"puzzle {i + 1}") for i, p in enumerate(puzzles)]
    if puzzle_file:
        try:
            with open(puzzle_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise InputError(f"--file {puzzle_file}: {e.strerror}") from None
        for n, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].split(",", 1)[0].strip()
            if text:
                boards.append(check_puzzle(text, f"--file {puzzle_file} line {n}"))
    if not boards:
        raise InputError("no puzzle: pass PUZZLE arguments or --file F")
    return boards
