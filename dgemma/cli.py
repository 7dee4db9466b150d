"""The `dgemma` command line: generate (and the other faces, which register their commands here)."""

from __future__ import annotations

import json
import sys

import click

from .errors import DgemmaError, InputError

# Parallel attempts (symmetric views) per puzzle when the CLI solves Sudoku: on the shipped model 8 views solve about
# 94% of held-out medium puzzles where one solves 58% (examples/sudoku/RUNS.md), at 8 canvases per denoising pass.
DEFAULT_ATTEMPTS = 8


def _fail(message: str, code: int = 2):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Turn every DgemmaError (bad input, missing file, missing backend) and bad option into one line on stderr."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DgemmaError as e:
            _fail(str(e))
        except click.UsageError as e:  # a bad option value: one line too, naming the option
            _fail(e.format_message())
        except KeyboardInterrupt:
            _fail("interrupted", 130)


@click.group(cls=_Group)
@click.version_option(package_name="dgemma")
def main():
    """Run DiffusionGemma block-diffusion models with PyTorch (--backend cuda) or MLX (--backend mlx)."""


def _backend_option(f):
    return click.option("--backend", default="cuda", show_default=True,
                        help="cuda (PyTorch: NVIDIA GPUs, also CPU) or mlx (Apple Silicon; mlx[cpu] on Linux).")(f)


@main.command()
@click.option("--model", "model_path", default=None,
              help="Model folder or hub id (e.g. google/diffusiongemma-26B-A4B-it). Default: the model shipped with "
                   "dgemma (a small random checkpoint until a trained one ships).")
@_backend_option
@click.option("--prompt", "-p", multiple=True, help="Prompt text; repeat for a batch. '-' reads standard input.")
@click.option("--prompt-file", type=click.Path(dir_okay=False), help="One prompt per line (a batch).")
@click.option("--chat/--no-chat", default=False, help="Wrap each prompt as a user turn with the chat template.")
@click.option("--max-new-tokens", type=int, default=None, help="Tokens to generate (whole canvases are denoised).")
@click.option("--steps", "max_denoising_steps", type=int, default=None, help="Maximum denoising steps per canvas.")
@click.option("--seed", type=int, default=None, help="Seed (prompt i of a batch uses seed + i).")
@click.option("--entropy-bound", type=float, default=None)
@click.option("--t-min", type=float, default=None)
@click.option("--t-max", type=float, default=None)
@click.option("--stability-threshold", type=int, default=None)
@click.option("--confidence-threshold", type=float, default=None)
@click.option("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's).")
@click.option("--device", default=None, help="Torch device for --backend cuda (default: cuda if available, else cpu).")
@click.option("--stream/--no-stream", default=False, help="Print each canvas as it is committed.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt with text, token ids and stats.")
@click.option("--stats/--no-stats", default=True, help="Print tokens per forward and steps per canvas to stderr.")
@click.option("--show-canvas", is_flag=True, help="Draw the canvas in the terminal as it denoises (one prompt).")
def generate(model_path, backend, prompt, prompt_file, chat, max_new_tokens, max_denoising_steps, seed,
             entropy_bound, t_min, t_max, stability_threshold, confidence_threshold, dtype, device, stream, as_json,
             stats, show_canvas=False):
    """Generate text with the block-diffusion sampler."""
    from .api import load
    from .assets import default_model_path, is_random_default

    prompts = _read_prompts(prompt, prompt_file)
    sampler = dict(max_new_tokens=max_new_tokens, max_denoising_steps=max_denoising_steps,
                   entropy_bound=entropy_bound, t_min=t_min, t_max=t_max, stability_threshold=stability_threshold,
                   confidence_threshold=confidence_threshold)
    path = model_path if model_path is not None else default_model_path()
    if model_path is None and is_random_default(path):
        click.echo("note: no --model given and no trained model ships with dgemma yet: using a small random "
                   "checkpoint (its output is noise)", err=True)
    from .backend import backend_class
    from .checkpoint import Checkpoint

    backend_class(backend)  # an unknown or missing backend fails before anything is read
    checkpoint = Checkpoint(path)
    checkpoint.sampler_defaults.updated(**sampler)  # bad sampler values fail before the weights load
    model = load(checkpoint, backend=backend, dtype=dtype, device=device, progress=sys.stderr.isatty())
    from .sudoku_task import is_sudoku_model

    if is_sudoku_model(model):
        who = "the built-in model" if model_path is None else f"--model {model_path}"
        boards = []
        for i, p in enumerate(prompts):
            try:
                boards.append(_check_puzzle(p, "--prompt" if len(prompts) == 1 else f"prompt {i + 1}"))
            except InputError as e:
                raise InputError(f"{who} is a Sudoku solver: pass an 81-character puzzle ('1'-'9', '.' or '0' for "
                                 f"blanks), or --model PATH for a text model ({e})") from None
        results = _solve(model, boards, seed=0 if seed is None else seed, constraints=True, retries=2,
                         attempts=DEFAULT_ATTEMPTS, sampler={k: v for k, v in sampler.items() if k != "max_new_tokens"})
        _print_sudoku(results, model, as_json=as_json, grid=True, stats=stats)
        return
    if show_canvas:
        from .live import show_canvas_cli

        return show_canvas_cli(model, prompts, seed=seed, chat=chat, sampler=sampler, stats=stats)
    if stream and len(prompts) == 1 and not as_json:
        for chunk in model.stream(prompts[0], seed=seed, chat=chat, **sampler):
            click.echo(chunk.text, nl=False)
            sys.stdout.flush()
        click.echo()
        return
    seeds = None if seed is None else [seed + i for i in range(len(prompts))]
    results = model.generate_batch(prompts, seeds=seeds, chat=chat, **sampler)
    for r in results:
        s = r.stats
        if as_json:
            click.echo(json.dumps({"text": r.text, "token_ids": r.token_ids, "finish_reason": s.finish_reason,
                                   "tokens_per_forward": s.tokens_per_forward, "steps_per_canvas": s.steps_per_canvas,
                                   "decoder_passes": s.decoder_passes, "prompt_tokens": s.prompt_tokens,
                                   "generated_tokens": s.generated_tokens, "seconds": s.seconds}))
        else:
            click.echo(r.text)
        if stats and not as_json:
            click.echo(f"[{s.generated_tokens} tokens, {s.canvases} canvas(es), steps per canvas "
                       f"{s.steps_per_canvas}, tokens/forward {s.tokens_per_forward:.2f}, {s.seconds:.2f}s, "
                       f"{model.backend.describe()}]", err=True)


def _read_prompts(prompt, prompt_file) -> list[str]:
    prompts = []
    for p in prompt:
        prompts.append(sys.stdin.read() if p == "-" else p)
    if prompt_file:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                prompts.extend(line.rstrip("\n") for line in f if line.strip())
        except OSError as e:
            raise InputError(f"--prompt-file {prompt_file}: {e.strerror}") from None
    if not prompts:
        raise InputError("no prompt: pass --prompt TEXT (or --prompt-file F)")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise InputError("--prompt is empty" if len(prompts) == 1 else f"prompt {i + 1} is empty")
    return prompts




@main.command("convert")
@click.argument("src")
@click.argument("dst", required=False)
@click.option("--to", "to", required=True, help="hf (plain float), mlx (MLX layout, optionally quantized) or cuda.")
@click.option("--bits", type=int, default=None, help="MLX affine quantization: 4 or 8.")
@click.option("--group-size", type=int, default=None, help="Quantization group: 32, 64 or 128 (MLX default 64, "
              "CUDA int4 default 128).")
@click.option("--mixed", is_flag=True, help="MLX: 4-bit experts, 8-bit attention, dense MLP, router and embedding.")
@click.option("--quant", default=None, help="CUDA: fp8 (e4m3, per-channel scales) or int4 (experts; rest bf16/FP8).")
@click.option("--rest", default=None, help="With --quant int4: fp8 or bf16 for the non-expert weights.")
@click.option("--dtype", default=None, help="Float dtype of unquantized tensors (bfloat16, float16, float32).")
@click.option("--shard-size-gb", type=float, default=4.0, show_default=True)
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option("--dry-run", is_flag=True, help="Print output sizes and peak memory from config.json alone.")
@click.option("--progress/--no-progress", default=True)
def convert_command(src, dst, to, bits, group_size, mixed, quant, rest, dtype, shard_size_gb, force, dry_run,
                    progress):
    """Convert SRC (folder or hub id) to DST in another format, streaming one tensor at a time."""
    from dgemma.convert import convert

    report = convert(src, dst, to=to, bits=bits, group_size=group_size, mixed=mixed, quant=quant, dtype=dtype,
                     force=force, dry_run=dry_run, progress=progress and not dry_run, rest=rest,
                     shard_size_gb=shard_size_gb)
    click.echo(report.format_report())


@main.group(cls=_Group)
def sudoku():
    """Solve Sudoku puzzles with a Sudoku model (by default the one built into dgemma)."""


@sudoku.command("solve")
@click.argument("puzzles", nargs=-1)
@click.option("--file", "puzzle_file", type=click.Path(dir_okay=False),
              help="Puzzles, one per line (81 cells; a line 'puzzle,solution' uses the first field; '#' comments).")
@click.option("--model", "model_path", default=None, help="A Sudoku model folder (default: the built-in one).")
@_backend_option
@click.option("--json", "as_json", is_flag=True, help='One {"puzzle", "solution", "solved", "steps", ...} per line.')
@click.option("--grid", is_flag=True, help="Print each solution as a 9x9 grid instead of one 81-char line.")
@click.option("--constraints/--no-constraints", default=True, show_default=True,
              help="Constraint-aware sampling: re-noise digits that break a rule or overwrite a given.")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="With --constraints: re-denoise a finished board that still breaks a rule, at most this often.")
@click.option("--attempts", type=click.IntRange(min=1), default=None,
              help=f"With --constraints: symmetric views of each puzzle denoised side by side; the first that solves "
                   f"it wins [default: {DEFAULT_ATTEMPTS}; 1 with --no-constraints].")
@click.option("--seed", type=int, default=0, show_default=True, help="Puzzle i uses seed + i.")
@click.option("--steps", "max_denoising_steps", type=click.IntRange(min=1), default=None,
              help="Maximum denoising steps per attempt (default: the model's).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Puzzles per batch (each attempt is one canvas of it).")
@click.option("--dtype", default=None)
@click.option("--device", default=None)
@click.option("--stats/--no-stats", default=True, help="Print the solve rate and mean steps to stderr.")
def sudoku_solve(puzzles, puzzle_file, model_path, backend, as_json, grid, constraints, retries, attempts, seed,
                 max_denoising_steps, batch_size, dtype, device, stats):
    """Solve PUZZLES (81 cells each: '1'-'9', '.' or '0' for blanks; whitespace ignored). One line per puzzle: the
    model's board (unsolved boards are printed too; --json says which)."""
    from .api import load
    from .assets import default_model_path
    from .sudoku_task import is_sudoku_model

    boards = [_check_puzzle(p, f"puzzle {i + 1}") for i, p in enumerate(puzzles)]
    if puzzle_file:
        try:
            with open(puzzle_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise InputError(f"--file {puzzle_file}: {e.strerror}") from None
        for n, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].split(",", 1)[0].strip()
            if text:
                boards.append(_check_puzzle(text, f"--file {puzzle_file} line {n}"))
    if not boards:
        raise InputError("no puzzle: pass PUZZLE arguments or --file F")
    if attempts is None:
        attempts = DEFAULT_ATTEMPTS if constraints else 1
    if attempts > 1 and not constraints:
        raise InputError("--attempts above 1 needs --constraints (the checker is what tells a solved board)")
    path = model_path if model_path is not None else default_model_path()
    model = load(path, backend=backend, dtype=dtype, device=device, progress=False)
    if not is_sudoku_model(model):
        raise InputError(f"--model {path} is not a Sudoku model (its tokenizer has no Sudoku cell tokens)")
    results = _solve(model, boards, seed=seed, constraints=constraints, retries=retries, attempts=attempts,
                     batch_size=batch_size, sampler={"max_denoising_steps": max_denoising_steps})
    _print_sudoku(results, model, as_json=as_json, grid=grid, stats=stats)


def _check_puzzle(text: str, name: str) -> str:
    from .sudoku_task import check_puzzle

    try:
        return check_puzzle(text, name)
    except ValueError as e:
        raise InputError(str(e)) from None


def _solve(model, boards, *, seed, constraints, retries, attempts, sampler, batch_size=64):
    from .sudoku_task import solve_puzzles

    try:
        return solve_puzzles(model, boards, seed=seed, constraints=constraints, max_retries=retries,
                             attempts=attempts, batch_size=batch_size * attempts, **sampler)
    except ValueError as e:  # a bad sampler value
        raise InputError(str(e)) from None


def _print_sudoku(results, model, *, as_json: bool, grid: bool, stats: bool) -> None:
    from .sudoku import format_grid

    for i, r in enumerate(results):
        if as_json:
            click.echo(json.dumps(r.to_json()))
        elif grid:
            if len(results) > 1:
                click.echo(f"# puzzle {i + 1}: " + ("solved" if r.solved else "NOT solved"))
            click.echo(format_grid(r.solution))
        else:
            click.echo(r.solution)
    if stats:
        solved = sum(r.solved for r in results)
        steps = sum(r.steps for r in results) / len(results)
        tpf = sum(r.tokens_per_forward for r in results) / len(results)
        secs = sum(r.seconds for r in results)
        views = max(r.attempts for r in results)
        width = f", {views} views per puzzle side by side" if views > 1 else ""
        click.echo(f"[solved {solved}/{len(results)}, mean {steps:.1f} denoising steps{width}, tokens/forward "
                   f"{tpf:.2f}, {secs:.2f}s, {model.backend.describe()}]", err=True)


@main.command()
@click.option("--model", "model_path", default=None, help="Model folder or hub id (default: the shipped model).")
@_backend_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=None, help="Requests denoised together (default 16).")
@click.option("--batching", type=click.Choice(["merged", "exact"]), default="merged", show_default=True,
              help="merged: one decoder pass for all requests; exact: one per request, bit-identical to solo runs.")
@click.option("--served-model-name", default=None, help="The model id clients send (default: the folder name).")
@click.option("--dtype", default=None)
@click.option("--device", default=None)
@click.option("--print-vllm-command", is_flag=True, help="Print the `vllm serve` command for this checkpoint and exit.")
@click.option("--max-model-len", type=int, default=None, help="With --print-vllm-command (default: the config's).")
def serve(model_path, backend, host, port, max_batch, batching, served_model_name, dtype, device, print_vllm_command,
          max_model_len):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models)."""
    if print_vllm_command:
        from .vllm import print_vllm_command as print_command

        print_command(model_path, served_model_name=served_model_name, host=host, port=port,
                      max_model_len=max_model_len, max_num_seqs=max_batch)
        return
    from .server import cli_serve

    cli_serve(model_path=model_path, backend=backend, host=host, port=port, max_batch=max_batch, batching=batching,
              served_model_name=served_model_name, dtype=dtype, device=device,
              print_vllm_command=print_vllm_command, max_model_len=max_model_len)


if __name__ == "__main__":  # pragma: no cover
    main()
