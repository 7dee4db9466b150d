"""Tasks: what a checkpoint is for, declared in its own config.json.

A checkpoint names its task with a top-level key, `"dgemma_task": "sudoku"`; a checkpoint without the key (every
Hugging Face checkpoint) is plain text. A task is a module registered here by name; it exports:

    NAME                             the name checkpoints declare
    check_prompt(prompt)             raise InputError for a prompt this task's models cannot take
    is_task_prompt(text) -> bool     whether a text is this task's kind of prompt (routes `dgemma generate` with no
                                     --model to this task's shipped model)
    run_generate(model, prompts, options: GenerateOptions)
                                     what `dgemma generate` does and prints for such a model
    cli_command() -> click.Command   the task's own command (`dgemma sudoku ...`)
    request_checker(model, prompt_ids)
                                     the constraint checker for one request (the server's attempts / retries)
    matches_legacy(checkpoint) -> bool
                                     whether an older checkpoint of this task that lacks the key is one
"""

from __future__ import annotations

import importlib
import weakref
from dataclasses import dataclass, field
from types import ModuleType

from ..errors import CheckpointError

TASK_KEY = "dgemma_task"
TEXT = "text"
_MODULES = {"sudoku": "dgemma.tasks.sudoku"}


def known_tasks() -> list[str]:
    return [TEXT, *_MODULES]


def task_module(name: str) -> ModuleType | None:
    """The module of a registered task; None for plain text."""
    return None if name == TEXT else importlib.import_module(_MODULES[name])


def declared_task(checkpoint) -> str:
    """The task a Checkpoint declares in config.json (`"dgemma_task"`), "text" when it declares none."""
    name = checkpoint.raw_config.get(TASK_KEY)
    if name is None:
        # Checkpoints written before the key existed (the first Sudoku models) are recognised the old way.
        return next((n for n in _MODULES if task_module(n).matches_legacy(checkpoint)), TEXT)
    if name not in known_tasks():
        raise CheckpointError(f"{checkpoint.path / 'config.json'}: {TASK_KEY} is {name!r}; dgemma knows "
                              + ", ".join(known_tasks()))
    return name


def task_of(checkpoint) -> ModuleType | None:
    """The task module of a Checkpoint, None for a plain text model."""
    return task_module(declared_task(checkpoint))


_TASK_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_prompt(checkpoint, prompt) -> None:
    """InputError when a prompt is not one the checkpoint's task takes (a text question to the Sudoku model); nothing
    for a text model. `Model.encode_prompt` calls it, so the API refuses what the CLI refuses."""
    if checkpoint not in _TASK_OF:
        _TASK_OF[checkpoint] = task_of(checkpoint)
    task = _TASK_OF[checkpoint]
    if task is not None:
        task.check_prompt(prompt)


def prompt_task(prompts: list[str]) -> str:
    """The task whose kind of prompt every one of `prompts` is ("text" unless all are, e.g. 81-cell puzzles)."""
    for name in _MODULES:
        if prompts and all(task_module(name).is_task_prompt(p) for p in prompts):
            return name
    return TEXT


def cli_commands() -> list:
    """Every task's own click command, for `dgemma` to add."""
    return [task_module(n).cli_command() for n in _MODULES]


@dataclass
class GenerateOptions:
    """What `dgemma generate` was asked for, handed to a task's `run_generate`."""

    who: str                          # how to name the model in messages ("the built-in model", "--model PATH")
    seed: int | None = None
    chat: bool = False
    stream: bool = False
    show_canvas: bool = False
    as_json: bool = False
    stats: bool = True
    sampler: dict = field(default_factory=dict)   # max_new_tokens, max_denoising_steps, entropy_bound, ...
