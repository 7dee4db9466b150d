"""The `dgemma` command line: generate (and the other faces, which register their commands here)."""

from __future__ import annotations

import json
import sys

import click

from .errors import DgemmaError, InputError

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
              help="Model folder or hub id (e.g. google/diffusiongemma-26B-A4B-it). Default: a model shipped with "
                   "dgemma: the Sudoku solver for 81-cell puzzles, the small text model (dgemma/assets/text) for "
                   "other prompts where it is installed.")
@_backend_option
@click.option("--prompt", "-p", multiple=True, help="Prompt text; repeat for a batch. '-' reads standard input.")
@click.option("--prompt-file", type=click.Path(dir_okay=False), help="One prompt per line (a batch).")
@click.option("--chat/--no-chat", default=False, help="Wrap each prompt as a user turn with the chat template.")
@click.option("--max-new-tokens", type=int, default=None, help="Tokens to generate (whole canvases are denoised).")
@click.option("--steps", "max_denoising_steps", type=int, default=None,
              help="Maximum denoising passes per canvas (default: the checkpoint's generation_config.json). On a "
                   "Sudoku model a retry may take as many again: its reported steps count every pass.")
@click.option("--seed", type=int, default=None, help="Seed (prompt i of a batch uses seed + i).")
@click.option("--entropy-bound", type=float, default=None,
              help="Per pass, accept sampled tokens (most confident first) while their summed entropy stays under "
                   "this bound; larger accepts more per pass (fewer steps, lower quality). Default 0.1.")
@click.option("--t-min", type=float, default=None,
              help="Sampling temperature at the last denoising step (the schedule goes linearly from --t-max).")
@click.option("--t-max", type=float, default=None, help="Sampling temperature at the first denoising step.")
@click.option("--stability-threshold", type=int, default=None,
              help="A canvas stops early once its argmax has not changed for this many passes and it is confident "
                   "(--confidence-threshold); 0 = confidence alone. Default 1.")
@click.option("--confidence-threshold", type=float, default=None,
              help="A canvas counts as confident when the mean entropy of its predictions is below this. Default "
                   "0.005.")
@click.option("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's).")
@click.option("--device", default=None, help="Torch device for --backend cuda (default: cuda if available, else cpu).")
@click.option("--stream/--no-stream", default=False,
              help="Print each canvas as it is committed (prompts one after another).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per prompt: text, token_ids, finish_reason, tokens_per_forward, "
                   "steps_per_canvas, decoder_passes, prompt_tokens, generated_tokens, seconds (a Sudoku model adds "
                   "puzzle, solution, solved, steps, retries, attempts).")
@click.option("--stats/--no-stats", default=True, help="Print tokens per forward and steps per canvas to stderr.")
@click.option("--show-canvas", is_flag=True,
              help="Draw the canvas in the terminal as it denoises (one prompt; a Sudoku model draws its board). "
                   "Needs rich (the serve extra).")
@click.option("--speed", type=click.Choice(["exact", "fast"]), default="exact", show_default=True,
              help="exact: the reference's computation; fast: denoise only the canvas positions still changing.")
@click.option("--json-schema", "json_schema", default=None, metavar="FILE",
              help="Structured output: the text is JSON valid under this JSON Schema file.")
@click.option("--regex", default=None, help="Structured output: the text matches this regular expression.")
@click.option("--choice", "choices", multiple=True, help="Structured output: the text is one of these; repeat.")
@click.option("--grammar", "grammar_file", default=None, metavar="FILE",
              help="Structured output: the text is in the language of this Lark or GBNF grammar file.")
@click.option("--image", "images", multiple=True, metavar="PATH",
              help="An image for the prompt (repeat for several; needs --chat): each prompt becomes one user turn of "
                   "the images, then its text.")
def generate(model_path, backend, prompt, prompt_file, chat, max_new_tokens, max_denoising_steps, seed,
             entropy_bound, t_min, t_max, stability_threshold, confidence_threshold, dtype, device, stream, as_json,
             stats, speed="exact", show_canvas=False, json_schema=None, regex=None, choices=(), grammar_file=None,
             images=()):
    """Generate text with the block-diffusion sampler (a Sudoku model solves the puzzles it is given)."""
    from .api import load
    from .assets import is_random_default
    from .backend import backend_class
    from .checkpoint import Checkpoint
    from .structured.spec import spec_from_flags
    from .tasks import GenerateOptions, task_of

    prompts = _read_prompts(prompt, prompt_file)
    _check_images(images, chat)
    spec, spec_flag = spec_from_flags(json_schema, regex, choices, grammar_file)
    if spec is not None and show_canvas:
        raise InputError(f"{spec_flag.split()[0]} and --show-canvas: structured output is not drawn live; drop one")
    sampler = dict(max_new_tokens=max_new_tokens, max_denoising_steps=max_denoising_steps,
                   entropy_bound=entropy_bound, t_min=t_min, t_max=t_max, stability_threshold=stability_threshold,
                   confidence_threshold=confidence_threshold)
    path = model_path if model_path is not None else _default_model(prompts, chat)
    if model_path is None and is_random_default(path):
        click.echo("note: no --model given and no trained model ships with dgemma: using a small random "
                   "checkpoint (its output is noise)", err=True)
    if show_canvas:
        _require_serve_extra("--show-canvas", ("rich",))
    if stream and as_json:
        raise InputError("--stream prints text as it comes and --json one object per prompt: pick one")
    backend_class(backend)  # an unknown or missing backend fails before anything is read
    checkpoint = Checkpoint(path)
    checkpoint.sampler_defaults.updated(**sampler)  # bad sampler values fail before the weights load
    if speed == "fast" and spec is not None:
        raise InputError(f"{spec_flag.split()[0]} and --speed fast: structured output runs at --speed exact")
    task = task_of(checkpoint)  # what the checkpoint declares it is for ("dgemma_task" in config.json)
    who = "the built-in model" if model_path is None else f"--model {model_path}"
    if images and task is not None:
        raise InputError(f"--image: {who} is a {getattr(task, 'NAME', 'task')} model, which takes no images")
    if task is not None and spec is not None:
        raise InputError(f"{spec_flag.split()[0]}: {who} is a {getattr(task, 'NAME', 'task')} model, whose task "
                         "decides the output; structured output is for text models")
    if task is not None:
        for p in prompts:
            task.check_prompt(p, who=who, other="--model PATH")
    else:
        checkpoint.require_tokenizer()
    model = load(checkpoint, backend=backend, dtype=dtype, device=device, progress=sys.stderr.isatty())
    if spec is not None:
        _compile_structured(model, spec, spec_flag, sampler)
    sampler["speed"] = speed
    if task is not None:
        return task.run_generate(model, prompts, GenerateOptions(
            who=who, seed=seed, chat=chat, stream=stream, show_canvas=show_canvas, as_json=as_json, stats=stats,
            sampler=sampler))
    prompts = _with_images(prompts, images)
    if show_canvas:
        from .live import show_canvas_cli

        return show_canvas_cli(model, prompts, seed=seed, chat=chat, sampler=sampler, stats=stats)
    if stream:
        for i, p in enumerate(prompts):
            _stream(model, p, seed=None if seed is None else seed + i, chat=chat, sampler=sampler, stats=stats,
                    spec=spec)
        return
    seeds = None if seed is None else [seed + i for i in range(len(prompts))]
    results = model.generate_batch(prompts, seeds=seeds, chat=chat, response_format=spec, **sampler)
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


def _default_model(prompts: list[str], chat: bool):
    """With no --model: the shipped text model for text (when installed), else the shipped Sudoku model."""
    from .assets import default_model_path, text_model_path
    from .tasks import TEXT, prompt_task

    text_model = text_model_path()
    if text_model is not None and (chat or prompt_task(prompts) == TEXT):
        return text_model
    return default_model_path()


def _compile_structured(model, spec, flag: str, sampler: dict) -> None:
    """Compile the structured-output flag's grammar once, before generating, so a spec the grammar engine refuses
    is one line naming the flag (generate then reuses the compiled grammar)."""
    from .structured import compile as compile_grammar

    try:
        compile_grammar(spec, model.tokenizer, model.config.vocab_size, model.settings(**sampler).eos_token_ids)
    except InputError as e:
        raise InputError(f"{flag}: {e}") from None


def _stream(model, prompt: str, *, seed, chat, sampler: dict, stats: bool, spec=None) -> None:
    """Print one prompt's canvases as they are committed, then its stats line."""
    import time

    started = time.perf_counter()
    tokens, steps = 0, []
    for chunk in model.stream(prompt, seed=seed, chat=chat, response_format=spec, **sampler):
        click.echo(chunk.text, nl=False)
        sys.stdout.flush()
        tokens += len(chunk.token_ids)
        steps.append(chunk.steps)
    click.echo()
    if stats:  # a stream reports no padding, so this line has no tokens/forward (the non-streamed one does)
        click.echo(f"[{tokens} tokens, {len(steps)} canvas(es), steps per canvas {steps}, "
                   f"{time.perf_counter() - started:.2f}s, {model.backend.describe()}]", err=True)


def _require_serve_extra(what: str, modules: tuple[str, ...]) -> None:
    """One line naming the extra when an optional dependency of `what` is not installed."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"{what} needs {', '.join(missing)}, part of the serve extra: pip install 'dgemma[serve]'")


def _check_port(host: str, port: int) -> None:
    """Bind the address once before the model loads, so a port in use is one line, not a server's traceback."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise InputError(f"--host {host}: {e.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            raise InputError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); pick another "
                             "--port") from None


def _check_images(images, chat: bool) -> None:
    """--image needs --chat (images enter the prompt through the chat template) and files that exist."""
    from pathlib import Path

    if images and not chat:
        raise InputError("--image needs --chat: images enter the prompt through the chat template")
    for path in images:
        if not Path(path).is_file():
            raise InputError(f"--image {path}: file not found")


def _with_images(prompts: list[str], images) -> list:
    """Each prompt as one user turn holding the images, then its text."""
    if not images:
        return prompts
    parts = [{"type": "image", "path": str(p)} for p in images]
    return [[{"role": "user", "content": parts + [{"type": "text", "text": p}]}] for p in prompts]


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
@click.option("--group-size", type=int, default=None, help="Quantization group: 32, 64 or 128 (MLX default 64; "
              "CUDA int4: whole groups, default the largest that divides the experts' widths, 64 on the real model).")
@click.option("--mixed", is_flag=True, help="MLX: 4-bit experts, 8-bit attention, dense MLP, router and embedding.")
@click.option("--quant", default=None, help="CUDA: fp8 (e4m3, per-channel scales) or int4 (experts; rest bf16/FP8).")
@click.option("--rest", default=None, help="With --quant int4: fp8 or bf16 for the non-expert weights.")
@click.option("--dtype", default=None, help="Float dtype of unquantized tensors (bfloat16, float16, float32).")
@click.option("--shard-size-gb", type=float, default=4.0, show_default=True,
              help="Largest output shard (model-0000N-of-0000M.safetensors), in GB.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option("--dry-run", is_flag=True, help="Print output sizes and peak memory from config.json alone.")
@click.option("--progress/--no-progress", default=True, help="A progress bar on stderr while converting.")
def convert_command(src, dst, to, bits, group_size, mixed, quant, rest, dtype, shard_size_gb, force, dry_run,
                    progress):
    """Convert SRC (folder or hub id) to DST in another format, streaming one tensor at a time."""
    from dgemma.convert import convert

    report = convert(src, dst, to=to, bits=bits, group_size=group_size, mixed=mixed, quant=quant, dtype=dtype,
                     force=force, dry_run=dry_run, progress=progress and not dry_run, rest=rest,
                     shard_size_gb=shard_size_gb)
    if not (progress and not dry_run):  # with the progress bar on, convert() prints the report itself
        click.echo(report.format_report())


@main.command()
@click.option("--model", "model_path", default=None, help="Model folder or hub id (default: the shipped model).")
@_backend_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="TCP port to listen on.")
@click.option("--max-batch", type=click.IntRange(min=1), default=None, help="Requests denoised together (default 16).")
@click.option("--batching", type=click.Choice(["merged", "exact"]), default="merged", show_default=True,
              help="merged: one decoder pass for all requests; exact: one per request, bit-identical to solo runs.")
@click.option("--prompt-cache-mb", type=click.FloatRange(min=0), default=512, show_default=True,
              help="Memory for the prompt cache: a request whose prompt starts with an already encoded prefix (a "
                   "shared system prompt, a resent chat) encodes only the rest; least recently used go first. 0: off.")
@click.option("--speed", type=click.Choice(["exact", "fast"]), default="exact", show_default=True,
              help="For requests that send no 'speed': exact (the reference's computation) or fast (denoise only the "
                   "canvas positions still changing).")
@click.option("--served-model-name", default=None, help="The model id clients send (default: the folder name).")
@click.option("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's).")
@click.option("--device", default=None, help="Torch device for --backend cuda (default: cuda if available, else cpu).")
@click.option("--print-vllm-command", is_flag=True, help="Print the `vllm serve` command for this checkpoint and exit.")
@click.option("--max-model-len", type=int, default=None, help="With --print-vllm-command (default: the config's).")
@click.option("--allow-remote-images", is_flag=True,
              help="Fetch http(s) image URLs in chat requests (at most 20 MB and 10 s each); default: data: URLs only.")
def serve(model_path, backend, host, port, max_batch, batching, prompt_cache_mb, speed, served_model_name, dtype,
          device, print_vllm_command, max_model_len, allow_remote_images=False):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models)."""
    if print_vllm_command:
        from .vllm import print_vllm_command as print_command

        print_command(model_path, served_model_name=served_model_name, host=host, port=port,
                      max_model_len=max_model_len, max_num_seqs=max_batch)
        return
    _require_serve_extra("dgemma serve", ("fastapi", "uvicorn"))
    _check_port(host, port)
    from .serve import cli_serve

    cli_serve(model_path=model_path, backend=backend, host=host, port=port, max_batch=max_batch, batching=batching,
              prompt_cache_mb=prompt_cache_mb, speed=speed, served_model_name=served_model_name, dtype=dtype,
              device=device, print_vllm_command=print_vllm_command, max_model_len=max_model_len,
              allow_remote_images=allow_remote_images)


@main.command("random-checkpoint")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--canvas-length", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens per canvas.")
@click.option("--force", is_flag=True, help="Replace FOLDER if it exists.")
def random_checkpoint(folder, seed, canvas_length, force):
    """Write a small random DiffusionGemma checkpoint to FOLDER (6 layers, hidden 64, 8 experts, a byte-level
    tokenizer and a chat template; 2.3 MB) to try every command on. Its output is noise."""
    from pathlib import Path

    from .random_model import write_random_checkpoint

    if Path(folder).exists() and not force:
        raise InputError(f"{folder} exists: pass --force to replace it")
    click.echo(write_random_checkpoint(folder, seed=seed, canvas_length=canvas_length))


def _add_task_commands() -> None:
    """Each task registers its own command (`dgemma sudoku ...`) through the task registry."""
    from .tasks import cli_commands

    for command in cli_commands():
        main.add_command(command)


_add_task_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
