"""Base versus tuned on Sudoku: the same held-out puzzles through an untrained model and the trained one.

    python examples/sudoku/compare.py --out runs/compare                       # the shipped model vs its untrained twin
    python examples/sudoku/compare.py --model runs/sudoku --base runs/other --n 32 --no-constraints --out runs/cmp
    python examples/sudoku/compare.py --model runs/sudoku --n 4 --difficulties medium,hard --no-animate --show hard:2 \
        --out /tmp/cmp

Puzzles: `--n` per difficulty (default: 50 givens, easy, medium) from `dgemma.tasks.sudoku.task.held_out_puzzles` at a
held-out seed (HELD_OUT_SEED + 0/1/2 for easy/medium/hard, + 100 + G for G givens), disjoint from the seeds
examples/sudoku/train.py draws its pools (0..13) and held-out evaluation sets (1_000_003..1_000_016) from; a --seed
that would collide is refused.

Base: by default a freshly initialised model of the tuned model's own config.json (`new_model(config, --base-seed)`,
exported with the Sudoku tokenizer into a temporary folder). For a model that examples/sudoku/train.py trained from
scratch with its default --seed 0, --base-seed 0 (the default) gives exactly the weights training started from, so the
comparison isolates what training learned. `--base FOLDER`
compares against any other checkpoint instead.

Each puzzle i gets sampling seed --sample-seed + i, the same for both models, so they draw the same noise. Printed per
difficulty and model: solved % (complete, rule-abiding, givens kept: `is_valid_solution`), mean denoising passes per
puzzle (constraint retries included), tokens per forward (all generated non-pad tokens / all decoder passes, pooled).

Then one puzzle (--show; by default a hard one the tuned model solves and the base does not) is generated again alone
with the same seed while `on_step` records the argmax board of every denoising pass, for both models: a rich terminal
animation (skipped with --no-animate or when stdout is not a terminal), a PNG contact sheet (base row above tuned row,
one board per selected pass) and an animated GIF (both boards, one frame per pass). Colours: givens on grey, accepted
digits green, not-yet-accepted argmax digits grey, digits that break a rule or differ from the unique solution red
(on grey where the model did not keep a given). Needs torch (for the default base), rich and Pillow.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

import dgemma
from dgemma.tasks.sudoku import task as sudoku_task
from dgemma.errors import DgemmaError
from dgemma.tasks.sudoku.puzzles import is_valid_solution, parse, violations
from dgemma.tasks.sudoku.task import (HELD_OUT_SEED, VOCAB_SIZE, decode_board, encode_prompt, make_checker,
                                      write_tokenizer)

DIFFICULTIES = ("50", "easy", "medium")  # where the shipped model stands: it solves about half of medium, few hard



def fail(message: str) -> NoReturn:
    """One `error:` line and exit code 2, as the dgemma CLI reports bad input."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def held_out_puzzles(difficulty: str, n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (puzzle, solution) pairs of a difficulty that no training run of the recipe has seen."""
    try:
        return sudoku_task.held_out_puzzles(difficulty, n, seed)
    except ValueError as e:
        fail(str(e))


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


def resolve_tuned(path: str | None) -> Path:
    """--model, or the model shipped with dgemma. With no model shipped, `default_model_path()` falls back to a random
    *text* model, which cannot read a puzzle: that is refused here rather than scored as 0%."""
    from dgemma.assets import default_model_path, is_random_default

    folder = Path(path) if path else default_model_path()
    if path is None and is_random_default(folder):
        fail("no Sudoku model is shipped with this dgemma yet; pass --model FOLDER "
             "(a checkpoint written by examples/sudoku/train.py)")
    return folder


def write_untrained_twin(tuned: dgemma.Model, folder: Path, seed: int) -> Path:
    """An untrained model with the tuned checkpoint's config and sampler defaults, as a checkpoint folder."""
    from dgemma.backends.cuda.train import export_hf, new_model

    config = dict(tuned.checkpoint.raw_config)
    config.pop("quantization", None)       # the twin is written in float32 whatever the tuned checkpoint's format
    config.pop("quantization_config", None)
    return export_hf(new_model(config, seed=seed), folder, config,
                     tuned.checkpoint.raw_generation_config or None, write_tokenizer)


def load_sudoku_model(where: Path, label: str, backend: str, device: str | None) -> dgemma.Model:
    try:
        model = dgemma.load(where, backend=backend, device=device)
    except DgemmaError as e:
        fail(f"{label} model: {e}")
    if model.config.vocab_size != VOCAB_SIZE or model.config.canvas_length < 82:
        fail(f"{label} model {where} is not a Sudoku model (vocab {model.config.vocab_size}, "
             f"canvas {model.config.canvas_length}; expected vocab {VOCAB_SIZE}, canvas >= 82)")
    return model


@dataclass
class Outcome:
    board: str              # the first 81 canvas cells as a board ('.' for any non-digit)
    solved: bool
    steps: int              # denoising passes, constraint retries included
    passes: int
    tokens: float           # non-pad generated tokens (tokens_per_forward x passes)
    retries: int


def outcome(puzzle: str, gen) -> Outcome:
    # Raw tokens keep canvas positions (the visible ones drop pads), so cell i is canvas position i as the checker saw.
    board = decode_board(gen.raw_token_ids[:81])
    s = gen.stats
    return Outcome(board, is_valid_solution(puzzle, board), sum(s.steps_per_canvas), s.decoder_passes,
                   s.tokens_per_forward * s.decoder_passes, s.retries)


def solve_all(model: dgemma.Model, puzzles: list[str], seeds: list[int], batch: int, sampler: dict,
              constraints: bool, retries: int) -> tuple[list[Outcome], float]:
    """Every puzzle through generate_batch, `batch` at a time; (outcomes, wall seconds)."""
    out: list[Outcome] = []
    t0 = time.perf_counter()
    for i in range(0, len(puzzles), batch):
        chunk = puzzles[i:i + batch]
        extra = dict(checker=make_checker(chunk), max_retries=retries) if constraints else {}
        gens = model.generate_batch([encode_prompt(p) for p in chunk], seeds=seeds[i:i + batch], **extra, **sampler)
        out += [outcome(p, g) for p, g in zip(chunk, gens)]
    return out, time.perf_counter() - t0


def summary(outs: list[Outcome]) -> dict:
    passes = sum(o.passes for o in outs)
    return {"solved": float(np.mean([o.solved for o in outs])) if outs else 0.0,
            "mean_steps": float(np.mean([o.steps for o in outs])) if outs else 0.0,
            "tokens_per_forward": sum(o.tokens for o in outs) / passes if passes else 0.0,
            "mean_retries": float(np.mean([o.retries for o in outs])) if outs else 0.0}


# --------------------------------------------------------------------------------------------------------------------
# Step-by-step trace of one puzzle
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Frame:
    number: int             # 1-based over the whole generation, retries included
    attempt: int            # 0: the first denoising of the canvas; k: the k-th constraint retry
    step: int               # pass within this attempt
    board: str
    accepted: np.ndarray    # bool [81]: the sampler accepted its sample at this cell in this pass


def trace(model: dgemma.Model, puzzle: str, seed: int, sampler: dict, constraints: bool,
          retries: int) -> tuple[Outcome, list[Frame]]:
    """Generate one puzzle alone, recording the argmax board of every denoising pass."""
    ops = model.backend.ops
    frames: list[Frame] = []

    def on_step(block, step, argmax, accepted):
        toks = np.asarray(ops.to_numpy(argmax)).reshape(-1)
        acc = np.asarray(ops.to_numpy(accepted)).reshape(-1).astype(bool)[:81]
        # A retry restarts the step count at 1: that is how an attempt boundary shows in the on_step stream.
        attempt = frames[-1].attempt + (step <= frames[-1].step) if frames else 0
        frames.append(Frame(len(frames) + 1, attempt, int(step), decode_board(toks), acc))

    extra = dict(checker=make_checker([puzzle]), max_retries=retries) if constraints else {}
    gen = model.generate(encode_prompt(puzzle), seed=seed, on_step=on_step, **extra, **sampler)
    return outcome(puzzle, gen), frames


# Cell kinds: a given the model kept; a given cell where the model put something else (a given it lost); a digit that
# breaks a rule or differs from the unique solution; a correct digit the sampler accepted this pass; a correct argmax
# digit it did not accept (re-noised, still tentative); a non-digit (noise) cell.
GIVEN, LOST_GIVEN, WRONG, ACCEPTED, TENTATIVE, NOISE = range(6)


def cell_kinds(frame: Frame, puzzle: str, solution: str) -> list[int]:
    bad = violations(frame.board, puzzle)
    kinds = []
    for i, ch in enumerate(frame.board):
        if puzzle[i] != ".":
            kinds.append(GIVEN if ch == puzzle[i] else LOST_GIVEN)
        elif ch == ".":
            kinds.append(NOISE)
        elif i in bad or ch != solution[i]:
            kinds.append(WRONG)
        else:
            kinds.append(ACCEPTED if frame.accepted[i] else TENTATIVE)
    return kinds


def count_wrong(kinds: list[int]) -> int:
    return sum(k in (WRONG, LOST_GIVEN) for k in kinds)


def frame_caption(frame: Frame, puzzle: str, solution: str) -> str:
    kinds = cell_kinds(frame, puzzle, solution)
    retry = f" (retry {frame.attempt})" if frame.attempt else ""
    return f"pass {frame.number}{retry} · {count_wrong(kinds)} wrong · {kinds.count(NOISE)} unfilled"


# --------------------------------------------------------------------------------------------------------------------
# Terminal animation (rich)
# --------------------------------------------------------------------------------------------------------------------

RICH_STYLE = {GIVEN: "bold white on grey30", LOST_GIVEN: "bold red on grey30", WRONG: "bold red",
              ACCEPTED: "bold green", TENTATIVE: "grey50", NOISE: "grey35"}


def rich_board(frame: Frame, puzzle: str, solution: str):
    from rich.text import Text

    kinds = cell_kinds(frame, puzzle, solution)
    out = Text()
    for r in range(9):
        if r in (3, 6):
            out.append("───────┼───────┼───────\n", style="grey50")
        for c in range(9):
            if c in (3, 6):
                out.append(" │", style="grey50")
            i = r * 9 + c
            out.append(" ")
            out.append(frame.board[i] if frame.board[i] != "." else "·", style=RICH_STYLE[kinds[i]])
        out.append("\n" if r < 8 else "")
    return out


def rich_view(k: int, traces: dict, puzzle: str, solution: str, title: str):
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 2))
    panels = []
    for label, (res, frames) in traces.items():
        f = frame_at(frames, k)
        done = k >= len(frames)
        status = (("solved" if res.solved else "not solved") + f" in {len(frames)} passes") if done else "denoising"
        panels.append(Panel(rich_board(f, puzzle, solution), title=f"{label} · {status}",
                            subtitle=frame_caption(f, puzzle, solution), width=48))
    grid.add_row(*panels)
    legend = Text.assemble(("given", RICH_STYLE[GIVEN]), "  ", ("given not kept", RICH_STYLE[LOST_GIVEN]), "  ",
                           ("accepted", RICH_STYLE[ACCEPTED]), "  ",
                           ("not yet accepted", RICH_STYLE[TENTATIVE]), "  ", ("wrong / breaks a rule", "bold red"))
    table = Table.grid()
    table.add_row(Text(title, style="bold cyan"))
    table.add_row(grid)
    table.add_row(legend)
    return table


def animate(traces: dict, puzzle: str, solution: str, title: str, fps: float) -> None:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    longest = max(len(frames) for _, frames in traces.values())
    if not console.is_terminal:
        console.print(rich_view(longest, traces, puzzle, solution, title))
        return
    with Live(rich_view(1, traces, puzzle, solution, title), console=console, auto_refresh=False) as live:
        for k in range(1, longest + 1):
            live.update(rich_view(k, traces, puzzle, solution, title), refresh=True)
            time.sleep(1.0 / fps)


# --------------------------------------------------------------------------------------------------------------------
# PNG contact sheet and GIF (Pillow)
# --------------------------------------------------------------------------------------------------------------------

PIL_FILL = {GIVEN: ((50, 50, 50), (215, 215, 215)), LOST_GIVEN: ((200, 20, 20), (215, 215, 215)),
            WRONG: ((200, 20, 20), (255, 225, 225)), ACCEPTED: ((20, 130, 40), (255, 255, 255)),
            TENTATIVE: ((140, 140, 140), (255, 255, 255)),
            NOISE: ((200, 200, 200), (255, 255, 255))}   # kind -> (text colour, cell background)


def load_font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)     # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def draw_text(draw, xy, text: str, font, fill, center: bool = False) -> None:
    x, y = xy
    if center:   # by bounding box: anchors work only with FreeType fonts
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        x, y = x - (l + r) / 2, y - (t + b) / 2
    draw.text((x, y), text, font=font, fill=fill)


def draw_board(draw, x0: int, y0: int, cell: int, frame: Frame, puzzle: str, solution: str, font) -> None:
    kinds = cell_kinds(frame, puzzle, solution)
    for i, ch in enumerate(frame.board):
        r, c = divmod(i, 9)
        fg, bg = PIL_FILL[kinds[i]]
        x, y = x0 + c * cell, y0 + r * cell
        draw.rectangle([x, y, x + cell, y + cell], fill=bg)
        draw_text(draw, (x + cell / 2, y + cell / 2), ch if ch != "." else "·", font, fg, center=True)
    for k in range(10):
        width, colour = (3, (40, 40, 40)) if k % 3 == 0 else (1, (190, 190, 190))
        draw.line([x0 + k * cell, y0, x0 + k * cell, y0 + 9 * cell], fill=colour, width=width)
        draw.line([x0, y0 + k * cell, x0 + 9 * cell, y0 + k * cell], fill=colour, width=width)


def frame_at(frames: list[Frame], k: int) -> Frame:
    """The board after pass k (held at the last pass once a model has stopped)."""
    return frames[min(k, len(frames)) - 1]


def sheet_passes(longest: int, ends: list[int], columns: int) -> list[int]:
    """At most `columns` pass numbers spread over 1..longest, always with each model's last pass."""
    picks = set(np.linspace(1, longest, num=max(2, columns - len(ends))).round().astype(int).tolist()) | set(ends)
    return sorted(p for p in picks if 1 <= p <= longest)


def contact_sheet(traces: dict, puzzle: str, solution: str, title: str, columns: int, cell: int = 22):
    from PIL import Image, ImageDraw

    longest = max(len(f) for _, f in traces.values())
    passes = sheet_passes(longest, [len(f) for _, f in traces.values()], columns)
    board, gap, label_w, head = 9 * cell, cell, 7 * cell, 3 * cell
    row_h = board + 2 * cell
    width = label_w + len(passes) * (board + gap) + gap
    height = head + len(traces) * row_h + 2 * cell
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    big, small, digits = load_font(int(cell * 0.8)), load_font(int(cell * 0.55)), load_font(int(cell * 0.65))
    draw_text(draw, (gap, cell * 0.6), title, big, (0, 0, 0))
    for j, p in enumerate(passes):
        draw_text(draw, (label_w + j * (board + gap) + board / 2, head - cell * 0.7), f"pass {p}", small,
                  (60, 60, 60), center=True)
    for r, (label, (res, frames)) in enumerate(traces.items()):
        y = head + r * row_h
        draw_text(draw, (gap, y + board / 2 - cell), label, big, (0, 0, 0))
        verdict = "solved" if res.solved else "not solved"
        draw_text(draw, (gap, y + board / 2 + cell * 0.3), f"{verdict}, {len(frames)} passes", small,
                  (20, 130, 40) if res.solved else (200, 20, 20))
        for j, p in enumerate(passes):
            x = label_w + j * (board + gap)
            f = frame_at(frames, p)
            draw_board(draw, x, y, cell, f, puzzle, solution, digits)
            wrong = count_wrong(cell_kinds(f, puzzle, solution))
            note = ("done · " if p >= len(frames) else "") + f"{wrong} wrong"
            draw_text(draw, (x + board / 2, y + board + cell * 0.6), note, small,
                      (200, 20, 20) if wrong else (90, 90, 90), center=True)
    legend_y = height - cell * 1.2
    x = gap
    for text, kind in (("given", GIVEN), ("given not kept", LOST_GIVEN), ("accepted", ACCEPTED),
                       ("not yet accepted", TENTATIVE), ("wrong / breaks a rule", WRONG)):
        fg, bg = PIL_FILL[kind]
        draw.rectangle([x, legend_y - cell * 0.35, x + cell * 0.7, legend_y + cell * 0.35], fill=bg, outline=fg)
        draw_text(draw, (x + cell, legend_y - cell * 0.35), text, small, fg)
        x += int(cell * 1.5 + draw.textlength(text, font=small)) + gap
    return img


def gif_frames(traces: dict, puzzle: str, solution: str, title: str, cell: int = 30) -> list:
    from PIL import Image, ImageDraw

    longest = max(len(f) for _, f in traces.values())
    board, gap = 9 * cell, cell
    width = len(traces) * (board + gap) + gap
    height = board + 4 * cell
    big, small, digits = load_font(int(cell * 0.6)), load_font(int(cell * 0.45)), load_font(int(cell * 0.65))
    images = []
    for k in range(1, longest + 1):
        img = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(img)
        draw_text(draw, (gap, cell * 0.3), f"{title} · pass {k}", small, (0, 0, 0))
        for j, (label, (res, frames)) in enumerate(traces.items()):
            x = gap + j * (board + gap)
            f = frame_at(frames, k)
            done = k >= len(frames)
            head = label + ((" · solved" if res.solved else " · not solved") if done else "")
            draw_text(draw, (x, cell * 1.1), head, big,
                      ((20, 130, 40) if res.solved else (200, 20, 20)) if done else (0, 0, 0))
            draw_board(draw, x, 2 * cell, cell, f, puzzle, solution, digits)
            draw_text(draw, (x, 2 * cell + board + cell * 0.4), frame_caption(f, puzzle, solution), small,
                      (90, 90, 90))
        images.append(img)
    return images


def save_gif(images: list, path: Path, fps: float) -> None:
    step_ms = int(1000 / fps)
    durations = [step_ms] * (len(images) - 1) + [3000]   # hold the outcome before the loop restarts
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0, optimize=True)


# --------------------------------------------------------------------------------------------------------------------


def choose_puzzle(spec: str, results: dict, difficulties: list[str]) -> tuple[str, int]:
    """--show: DIFFICULTY:INDEX, or 'auto' = the first puzzle the tuned model solves and the base does not, looking in
    the difficulties from the last listed to the first (else the first the tuned model solves, else the last
    difficulty's first puzzle)."""
    if spec != "auto":   # validated against --difficulties and --n in main
        name, _, idx = spec.partition(":")
        return name, int(idx)
    for test in (lambda t, b, i: t[i].solved and not b[i].solved, lambda t, b, i: t[i].solved):
        for name in reversed(difficulties):
            tuned, base = results["tuned"][name], results["base"][name]
            for i in range(len(tuned)):
                if test(tuned, base, i):
                    return name, i
    return difficulties[-1], 0


def markdown_table(summaries: dict, difficulties: list[str], labels: list[str]) -> str:
    head = ["difficulty"] + [f"{m} {label}" for m in ("solved %", "mean steps", "tokens/forward") for label in labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for d in difficulties:
        cells = [d]
        cells += [f"{100 * summaries[label][d]['solved']:.1f}" for label in labels]
        cells += [f"{summaries[label][d]['mean_steps']:.1f}" for label in labels]
        cells += [f"{summaries[label][d]['tokens_per_forward']:.2f}" for label in labels]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None,
                    help="the tuned Sudoku checkpoint (default: the model shipped with dgemma)")
    ap.add_argument("--base", default=None, help="the comparison checkpoint (default: an untrained model of --model's "
                    "architecture)")
    ap.add_argument("--base-seed", type=int, default=0, help="initialisation seed of the default base (0 = the "
                    "training script's default, i.e. the tuned model's own starting weights)")
    ap.add_argument("--backend", default="cuda", help="cuda (PyTorch, also on CPU) or mlx")
    ap.add_argument("--device", default=None)
    ap.add_argument("--n", type=int, default=32, help="held-out puzzles per difficulty")
    ap.add_argument("--difficulties", default=",".join(DIFFICULTIES),
                    help="comma-separated: easy, medium, hard, or a number of givens (e.g. 50)")
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED,
                    help="held-out puzzle seed (+0 easy, +1 medium, +2 hard, +100+G for G givens)")
    ap.add_argument("--sample-seed", type=int, default=0, help="puzzle i is sampled with seed SAMPLE_SEED + i")
    ap.add_argument("--batch", type=int, default=32, help="puzzles per generate_batch call")
    ap.add_argument("--constraints", action=argparse.BooleanOptionalAction, default=True,
                    help="constraint-aware sampling with the Sudoku checker (re-noise violating digits, retry)")
    ap.add_argument("--retries", type=int, default=2, help="max_retries with --constraints")
    ap.add_argument("--max-steps", type=int, default=None, help="max denoising steps per attempt (default: the "
                    "checkpoint's generation_config)")
    ap.add_argument("--show", default="auto", help="the puzzle to trace step by step: DIFFICULTY:INDEX or auto")
    ap.add_argument("--animate", action=argparse.BooleanOptionalAction, default=True,
                    help="play the trace in the terminal")
    ap.add_argument("--fps", type=float, default=4.0, help="passes per second in the animation and the GIF")
    ap.add_argument("--out", default="runs/sudoku-compare", help="folder for the PNG, the GIF and results.json")
    ap.add_argument("--png", default=None, help="contact sheet path (default OUT/convergence.png)")
    ap.add_argument("--gif", default=None, help="animation path (default OUT/convergence.gif)")
    ap.add_argument("--columns", type=int, default=12, help="most boards per row in the contact sheet")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    try:
        difficulties = sudoku_task.parse_difficulties(args.difficulties)
    except ValueError as e:
        ap.error(f"--difficulties: {e}")
    if args.n < 1:
        ap.error("--n must be at least 1")
    show_name, _, show_index = args.show.partition(":")
    if args.show != "auto" and not (show_name in difficulties and show_index.isdigit() and int(show_index) < args.n):
        ap.error(f"--show {args.show!r}: auto, or DIFFICULTY:INDEX with DIFFICULTY in {','.join(difficulties)} and "
                 "INDEX < --n")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = Path(args.png) if args.png else out / "convergence.png"
    gif = Path(args.gif) if args.gif else out / "convergence.gif"
    tuned_path = resolve_tuned(args.model)
    data = {d: held_out_puzzles(d, args.n, args.seed) for d in difficulties}
    models = {"tuned": load_sudoku_model(tuned_path, "tuned", args.backend, args.device)}
    tmp = tempfile.TemporaryDirectory(prefix="dgemma-base-")
    if args.base:
        base_path = Path(args.base)
        base_desc = str(base_path)
    else:
        base_path = write_untrained_twin(models["tuned"], Path(tmp.name), args.base_seed)
        base_desc = f"untrained (same config, init seed {args.base_seed})"
    models = {"base": load_sudoku_model(base_path, "base", args.backend, args.device), "tuned": models["tuned"]}

    sampler = {"max_new_tokens": models["tuned"].config.canvas_length}
    if args.max_steps:
        sampler["max_denoising_steps"] = args.max_steps
    mode = f"constraints on, {args.retries} retries" if args.constraints else "constraints off"
    print(f"base: {base_desc}\ntuned: {tuned_path}\n{args.n} held-out puzzles per difficulty (seed {args.seed}), "
          f"{mode}, backend {models['tuned'].backend.describe()}", file=sys.stderr)

    results: dict = {label: {} for label in models}
    summaries: dict = {label: {} for label in models}
    for label, model in models.items():
        for d in difficulties:
            puzzles = [p for p, _ in data[d]]
            seeds = [args.sample_seed + i for i in range(len(puzzles))]
            outs, wall = solve_all(model, puzzles, seeds, args.batch, sampler, args.constraints, args.retries)
            results[label][d] = outs
            summaries[label][d] = dict(summary(outs), seconds_per_puzzle=wall / len(puzzles))
            print(f"  {label} {d}: {100 * summaries[label][d]['solved']:.1f}% solved, {wall:.1f}s", file=sys.stderr)
    print()
    print(markdown_table(summaries, difficulties, list(models)))
    print()

    name, idx = choose_puzzle(args.show, results, difficulties)
    puzzle, solution = (parse(x) for x in data[name][idx])
    givens = sum(ch != "." for ch in puzzle)
    traces = {label: trace(model, puzzle, args.sample_seed + idx, sampler, args.constraints, args.retries)
              for label, model in models.items()}
    title = f"{name} puzzle #{idx} ({givens} givens), {mode}"
    for label, (res, frames) in traces.items():
        same = res.solved == results[label][name][idx].solved
        print(f"{label}: {'solved' if res.solved else 'not solved'} in {len(frames)} passes"
              + ("" if same else " (differs from its batched run: batched rounding changed the trajectory)"))
    if args.animate:
        animate(traces, puzzle, solution, title, args.fps)
    contact_sheet(traces, puzzle, solution, title, args.columns).save(png)
    save_gif(gif_frames(traces, puzzle, solution, title), gif, args.fps)
    report = {"base": base_desc, "tuned": str(tuned_path), "seed": args.seed, "n": args.n,
              "constraints": args.constraints, "retries": args.retries if args.constraints else 0,
              "summary": summaries, "shown": {"difficulty": name, "index": idx, "puzzle": puzzle,
                                              "passes": {k: len(f) for k, (_, f) in traces.items()}}}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {png}, {gif}, {out / 'results.json'}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
