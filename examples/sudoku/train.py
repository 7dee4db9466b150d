"""Train a small DiffusionGemma-architecture model to solve Sudoku with the block-diffusion objective.

    python examples/sudoku/train.py --out runs/sudoku --steps 3000 --batch 32
    python examples/sudoku/train.py --out runs/sudoku --steps 6000 --resume     # continue from OUT/train_state.pt
    python examples/sudoku/train.py --out runs/lora --init runs/sudoku --lora-rank 8 --lr 1.5e-4 --difficulty hard

Data: a pool of unique-solution puzzles per difficulty (`--pool EASY,MEDIUM,HARD`), each training example a random
symmetry of one of them (`dgemma.tasks.sudoku.puzzles.augment`: digit relabelling, band/row/stack/column permutations,
transpose), so the model practically never sees the same example twice. `--difficulty curriculum` (the default) moves
the mix from mostly easy to mostly medium and hard over the run; a name (easy, medium, hard, minimal) or LO,HI givens
fixes it. A --mix of four weights adds a fourth pool, "minimal" (`dgemma.tasks.sudoku.minimal`: minimal unique puzzles
with at most 26 givens; its size is --pool's fourth number), so a curriculum can end on the hardest puzzles.
`--bf16` runs the forward and backward passes under bfloat16 autocast (float32 weights and optimizer state);
examples/sudoku/train_gpu.sh is the one-command accelerator run.

Starts from a fresh random model of `dgemma.tasks.sudoku.task.sudoku_model_config()` (or `--init FOLDER`), writes a
Hugging Face-layout checkpoint into --out (config.json, generation_config.json, model.safetensors with LoRA merged,
tokenizer.json) that `dgemma.load(OUT)` runs on either backend, plus train_state.pt (resumable;
train_state.safetensors with `--backend mlx`, the same recipe in MLX) and, with LoRA, the
adapters alone in OUT/adapter/ (PEFT names).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from dgemma.tasks.sudoku.minimal import generate_hard_dataset
from dgemma.tasks.sudoku.puzzles import augment, generate_dataset
from dgemma.tasks.sudoku.task import (CANVAS_LENGTH, encode_batch, solve_rate, sudoku_generation_config,
                                      sudoku_model_config, write_tokenizer)
from dgemma.training import LORA_TARGETS


def parse_mix(text: str) -> tuple[np.ndarray, np.ndarray]:
    """--mix "E,M,H:E,M,H" -> two probability vectors over the easy/medium/hard pools (each normalised to 1), or
    "E,M,H,X:E,M,H,X" over easy/medium/hard/minimal; ValueError for anything else."""
    try:
        ends = [np.array([float(x) for x in part.split(",")]) for part in text.split(":")]
    except ValueError:
        ends = []
    if (len(ends) != 2 or ends[0].shape != ends[1].shape or ends[0].shape not in ((3,), (4,))
            or any((e < 0).any() or e.sum() <= 0 for e in ends)):
        raise ValueError(f"{text!r}: expected two easy,medium,hard[,minimal] weight lists of one length joined by "
                         "':', e.g. 0.7,0.3,0:0.15,0.45,0.4")
    return ends[0] / ends[0].sum(), ends[1] / ends[1].sum()


class OutOfTime(Exception):
    """--max-minutes ran out: raised by the batch sampler at the start of step `step`."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


def make_pool(n: int, band, seed: int, workers: int | None = 1) -> list[tuple[str, str]]:
    """`n` (puzzle, solution) pairs of a band: "minimal" from the hard generator, anything else `generate_dataset`'s."""
    if band == "minimal":
        return generate_hard_dataset(n, seed=seed, workers=workers)
    return generate_dataset(n, band, seed=seed, workers=workers)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (checkpoint + train_state.pt)")
    ap.add_argument("--steps", type=int, default=2000, help="total optimizer steps (a resumed run counts earlier ones)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    ap.add_argument("--init", default=None, help="start from this checkpoint folder instead of a random model")
    ap.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning")
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--lora-targets", default=",".join(LORA_TARGETS))
    ap.add_argument("--difficulty", default="curriculum", help="curriculum, easy, medium, hard, minimal, or LO,HI "
                    "givens")
    ap.add_argument("--mix", default="0.7,0.3,0:0.15,0.45,0.4",
                    help="curriculum weights easy,medium,hard at the first step : at the last (linear in between); "
                         "a run continuing a trained model starts harder, e.g. 0.2,0.5,0.3:0.1,0.45,0.45")
    ap.add_argument("--pool", default="6000,10000,5000", help="unique puzzles generated per difficulty (easy,medium,"
                    "hard); with a fixed difficulty the first number")
    ap.add_argument("--eval-size", type=int, default=64)
    ap.add_argument("--decay-steps", type=int, default=0, help="cosine learning-rate decay over this many steps "
                    "(0: constant after warmup)")
    ap.add_argument("--encoder-loss-weight", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--solve-eval", type=int, default=0, help="also measure the solve rate on this many held-out "
                    "puzzles at each evaluation (full dgemma generation with the Sudoku checker)")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--canvas-length", type=int, default=CANVAS_LENGTH)
    ap.add_argument("--backend", choices=["cuda", "mlx"], default="cuda",
                    help="cuda: PyTorch (GPU if available, else CPU); mlx: MLX (Apple silicon; CPU build on Linux)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the elementwise-heavy layer pieces "
                    "(PyTorch backend; about an eighth faster on CPU after a minute of compiling)")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward and backward passes "
                    "(PyTorch backend; meant for CUDA)")
    ap.add_argument("--max-minutes", type=float, default=0, help="stop training after this many minutes (counted "
                    "from the first step; 0: no limit) and export what it reached")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.bf16 and args.backend != "cuda":
        ap.error("--bf16 needs --backend cuda (PyTorch autocast)")
    try:  # before any folder is made or puzzle generated
        mix_start, mix_end = parse_mix(args.mix)
    except ValueError as e:
        ap.error(f"--mix {e}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Both backends implement the same recipe API (TrainConfig, Trainer, new_model, load_model, export_hf, ...).
    recipe = importlib.import_module(f"dgemma.backends.{args.backend}.train")
    TrainConfig, Trainer, export_hf = recipe.TrainConfig, recipe.Trainer, recipe.export_hf
    if args.backend == "cuda":
        import torch

        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        state_file = out / "train_state.pt"
        load_kw = {"device": args.device}
    else:
        state_file = out / "train_state.safetensors"
        load_kw = {}
    difficulty = tuple(int(x) for x in args.difficulty.split(",")) if "," in args.difficulty else args.difficulty

    if args.compile and args.backend == "cuda":
        recipe.compile_hot_paths()
    if args.init:
        model, config = recipe.load_model(args.init, **load_kw)
        config = dict(config)
    else:
        config = sudoku_model_config(hidden_size=args.hidden, num_hidden_layers=args.layers,
                                     intermediate_size=2 * args.hidden, canvas_length=args.canvas_length)
        model = recipe.new_model(config, seed=args.seed, **load_kw)
    canvas = int(config["canvas_length"])

    t0 = time.perf_counter()
    sizes = [int(x) for x in args.pool.split(",")]
    if args.difficulty == "curriculum":
        bands = {"easy": "easy", "medium": "medium", "hard": "hard", "minimal": "minimal"}
        bands = dict(list(bands.items())[:len(mix_start)])
    else:
        bands = {args.difficulty: difficulty}
    pools = {name: make_pool(sizes[min(i, len(sizes) - 1)], band, args.seed + i, workers=None)
             for i, (name, band) in enumerate(bands.items())}
    held_out = {name: make_pool(args.eval_size, band, args.seed + 1_000_003 + i)
                for i, (name, band) in enumerate(bands.items())}
    print("data: " + ", ".join(f"{len(p)} {n}" for n, p in pools.items()) + f" puzzles (+{args.eval_size} held out "
          f"each) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if args.threads and args.backend == "cuda":
        torch.set_num_threads(args.threads)
    names = list(pools)
    eval_name = "medium" if "medium" in held_out else names[0]
    eval_pairs = held_out[eval_name]
    eval_prompts, eval_targets = encode_batch(eval_pairs, canvas)
    eval_blanks = np.array([[c == "." for c in p] for p, _ in eval_pairs])

    def mix(step: int) -> np.ndarray:
        """Sampling weights over the pools at `step`: linear from --mix's start weights to its end weights."""
        if len(names) == 1:
            return np.ones(1)
        f = min(1.0, step / max(1, args.steps))
        return (1 - f) * mix_start + f * mix_end

    def batch_fn(step: int, rng: np.random.Generator):
        if args.max_minutes and time.perf_counter() - t_train > 60 * args.max_minutes:
            raise OutOfTime(step)
        which = rng.choice(len(names), size=args.batch, p=mix(step))
        picked = [pools[names[w]][rng.integers(len(pools[names[w]]))] for w in which]
        return encode_batch(augment([p for p, _ in picked], [s for _, s in picked], rng), canvas)

    cfg = TrainConfig(lr=args.lr, batch=args.batch, steps=args.steps, seed=args.seed, warmup_steps=args.warmup,
                      lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                      lora_targets=tuple(t for t in args.lora_targets.split(",") if t),
                      eval_every=args.eval_every, save_every=args.save_every, device=args.device,
                      decay_steps=args.decay_steps, encoder_loss_weight=args.encoder_loss_weight,
                      weight_decay=0.0 if args.lora_rank else 0.01)
    trainer = Trainer(model, cfg, model_config=config)
    if args.resume:
        if not state_file.exists():
            ap.error(f"--resume: {state_file} does not exist")
        print(f"resumed from {state_file} at step {trainer.load(state_file)}", file=sys.stderr)
    if args.backend == "cuda":
        n_train, n_all = sum(p.numel() for p in trainer.params), sum(p.numel() for p in model.parameters())
    else:
        from mlx.utils import tree_flatten

        n_train, n_all = trainer.num_trainable, sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"model: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.3f}M trainable", file=sys.stderr)

    gen_cfg = sudoku_generation_config(canvas)

    def evaluate(tr: Trainer) -> dict:
        res = tr.one_step_accuracy(eval_prompts, eval_targets, blanks=eval_blanks)
        if args.solve_eval:
            export_hf(tr.model, out, config, gen_cfg, write_tokenizer)
            for name in names:
                r = solve_rate(out, held_out[name][: args.solve_eval], backend=args.backend, device=args.device)
                res.update({f"{name}_solved": r["solve_rate"], f"{name}_steps": r["steps"]})
        res["minutes"] = (time.perf_counter() - t_train) / 60
        return res

    log_file = (out / "log.jsonl").open("a")

    def log(parts: dict) -> None:
        log_file.write(json.dumps(parts) + "\n")
        log_file.flush()
        if any(k.startswith("eval/") for k in parts):
            print(f"step {parts['step']}: loss {parts['loss']:.4f} " + " ".join(
                f"{k[5:]} {v:.3f}" for k, v in parts.items() if k.startswith("eval/")), file=sys.stderr)

    t_train = time.perf_counter()
    # bf16 autocast: matmuls and attention in bfloat16, weights, gradients' accumulation and AdamW state in float32.
    precision = (torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16) if args.bf16
                 else contextlib.nullcontext())
    try:
        with precision:
            trainer.fit(None, None, args.steps, checkpoint=str(state_file), evaluate=evaluate,
                        progress=not args.no_progress, log=log, batch_fn=batch_fn,
                        on_save=lambda tr: export_hf(tr.model, out, config, gen_cfg, write_tokenizer))
    except OutOfTime as stop:
        # Raised before step `stop.step` drew its batch, so the weights are those of a finished step.
        print(f"--max-minutes {args.max_minutes:g}: stopped before step {stop.step} of {args.steps}", file=sys.stderr)
        trainer.save(str(state_file))
    log_file.close()
    export_hf(trainer.model, out, config, gen_cfg, write_tokenizer)
    if args.lora_rank:
        recipe.save_lora(trainer.model, out / "adapter")
    final = trainer.one_step_accuracy(eval_prompts, eval_targets, blanks=eval_blanks)
    last = trainer.history[-1] if trainer.history else {}
    print(json.dumps({"step": trainer.step, "loss": last.get("loss"), **final, "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
