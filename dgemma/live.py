"""A live terminal view of the canvas as it denoises (`dgemma generate --show-canvas`), drawn with `rich`.

Committed text is printed plainly; the canvas being denoised shows the model's current argmax token at every position,
firm (bold) where the sampler accepted its sample this step and dim where the position is re-noised. The view is fed by
`Model.generate`'s per-pass (`on_step`) and per-canvas (`on_canvas`) hooks, so the result is the same generation.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import numpy as np

from .api import Generation, Model, Prompt


def _piece(tokenizer, t: int) -> str:
    if tokenizer is None:
        return f"<{t}>"
    s = tokenizer.decode([int(t)])
    return s.replace("\n", "↵").replace("\r", "").replace("\t", "→") or "·"


def render_canvas(committed: str, tokens, accepted, tokenizer, header: str):
    """A rich Text: header line, the committed text, then the canvas (accepted positions firm, others dim)."""
    from rich.text import Text

    out = Text()
    out.append(header + "\n", style="bold cyan")
    out.append(committed)
    if tokens is not None:
        for t, a in zip(tokens, accepted):
            out.append(_piece(tokenizer, int(t)), style="bold" if a else "dim")
    return out


def generate_live(model: Model, prompt: Prompt, *, seed: int | None = None, chat: bool | None = None,
                  console=None, refresh_per_second: float = 15.0, **sampler: Any) -> Generation:
    """Generate one prompt while drawing each denoising step; returns what `model.generate` returns for the same
    prompt, seed and settings (it is that call, with the engine's per-pass and per-canvas hooks)."""
    from rich.console import Console
    from rich.live import Live

    console = console if console is not None else Console()
    settings = model.settings(**{k: v for k, v in sampler.items() if k != "speed"})
    seed = seed if seed is not None else secrets.randbits(63)
    ops = model.backend.ops
    tok = model.tokenizer
    N = settings.max_denoising_steps
    shown = {"committed": "", "last": 0.0}
    min_gap = 1.0 / refresh_per_second if refresh_per_second > 0 else 0.0
    with Live(render_canvas("", None, None, tok, "canvas 1 · starting"), console=console,
              auto_refresh=False, transient=False) as live:

        def on_step(block, step, argmax, accepted):
            now = time.perf_counter()
            if now - shown["last"] < min_gap and step != N:
                return
            shown["last"] = now
            toks = np.asarray(ops.to_numpy(argmax)).reshape(-1)
            acc = np.asarray(ops.to_numpy(accepted)).reshape(-1).astype(bool)
            header = f"canvas {block + 1} · step {step}/{N} · accepted {int(acc.sum())}/{acc.size}"
            live.update(render_canvas(shown["committed"], toks, acc, tok, header), refresh=True)

        def on_canvas(chunk):
            shown["committed"] += chunk.text if tok is not None else " ".join(map(str, chunk.token_ids))
            live.update(render_canvas(shown["committed"], None, None, tok,
                                      f"canvas {chunk.index + 1} committed after {chunk.steps} steps"), refresh=True)

        return model.generate(prompt, seed=seed, chat=chat, on_step=on_step, on_canvas=on_canvas, **sampler)


def show_canvas_cli(model: Model, prompts: list[str], *, seed, chat, sampler: dict, stats: bool) -> None:
    """`dgemma generate --show-canvas`: one prompt, drawn live on stderr's terminal; the final text goes to stdout."""
    import click
    from rich.console import Console

    from .errors import InputError

    if len(prompts) != 1:
        raise InputError("--show-canvas draws one prompt at a time")
    console = Console(stderr=True)
    result = generate_live(model, prompts[0], seed=seed, chat=chat, console=console, **sampler)
    click.echo(result.text)
    if stats:
        s = result.stats
        click.echo(f"[{s.generated_tokens} tokens, {s.canvases} canvas(es), steps per canvas {s.steps_per_canvas}, "
                   f"tokens/forward {s.tokens_per_forward:.2f}, {s.seconds:.2f}s, {model.backend.describe()}]",
                   err=True)
