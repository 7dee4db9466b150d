"""Sudoku as a dgemma task (a checkpoint declares it with `"dgemma_task": "sudoku"` in config.json).

    puzzles.py   board format, rule checker, exact solver, unique-puzzle generator, symmetries (no model needed)
    task.py      the model's side: tokenizer, prompt/target encoding, constraint checker, solve_puzzles
    cli.py       `dgemma sudoku solve`, and what `dgemma generate` prints for a Sudoku model
    view.py      the 9x9 board drawn live while it denoises (`--show-canvas`)

This module is the task's entry in the registry (`dgemma.tasks`): it imports nothing heavy until a hook is called.
"""

from __future__ import annotations

NAME = "sudoku"


def _puzzle_error(e: ValueError, who: str, other: str):
    from ...errors import InputError

    return InputError(f"{who} is a Sudoku solver: pass an 81-character puzzle ('1'-'9', '.' or '0' for blanks), or "
                      f"{other} for a text model ({e})")


def check_prompt(prompt, *, who: str = "this model", other: str = "dgemma.load(PATH)") -> None:
    """InputError unless `prompt` is a puzzle string or token ids: a text or chat prompt on a Sudoku model would
    come back as digits, so it is refused in one line. `who` names the model, `other` says how to get a text one."""
    from .task import check_puzzle

    if isinstance(prompt, str):
        try:
            check_puzzle(prompt, "the prompt")
        except ValueError as e:
            raise _puzzle_error(e, who, other) from None
    elif any(isinstance(m, dict) for m in prompt):
        raise _puzzle_error(ValueError("chat messages are not a puzzle"), who, other)


def is_task_prompt(text: str) -> bool:
    """Whether `text` is a well-formed puzzle (81 cells whose givens break no rule)."""
    from .task import check_puzzle

    try:
        check_puzzle(text)
    except (TypeError, ValueError):
        return False
    return True


def matches_legacy(checkpoint) -> bool:
    """A Sudoku checkpoint written before `dgemma_task` existed: the 128-token Sudoku vocabulary, cell tokens and
    all, in its config and tokenizer.json."""
    from .task import CELL_IDS, CELL_TOKENS, VOCAB_SIZE

    if checkpoint.config.vocab_size != VOCAB_SIZE or not (checkpoint.path / "tokenizer.json").exists():
        return False
    tok = checkpoint.tokenizer()
    return tok.token_to_id(CELL_TOKENS[0]) == CELL_IDS[0] and tok.token_to_id(CELL_TOKENS[-1]) == CELL_IDS[-1]


def request_checker(model, prompt_ids):
    """The constraint checker for one request whose prompt (token ids) encodes a puzzle: `checker(row, canvas)` flags
    digits that repeat in a row, column or box or overwrite a given (every row of the request is that puzzle)."""
    from .task import BOS, decode_board, make_checker

    ids = list(prompt_ids)
    cells = ids[1:] if ids and ids[0] == BOS else ids  # <bos> + 81 cells + <sep> + the cell tokens
    return make_checker([decode_board(cells)])


def run_generate(model, prompts: list[str], options) -> None:
    from .cli import run_generate as run

    run(model, prompts, options)


def cli_command():
    from .cli import sudoku_command

    return sudoku_command()
