"""Train a small DiffusionGemma-architecture model to solve Sudoku with the block-diffusion objective.

    python examples/sudoku/train.py --out runs/sudoku --steps 2000 --batch 32
    python examples/sudoku/train.py --out runs/sudoku --steps 4000 --resume     # continue from OUT/train_state.pt
    python examples/sudoku/train.py --out runs/lora --init runs/sudoku --lora-rank 8 --lr 1.5e-4  # LoRA on a checkpoint

Starts from a fresh random model of `dgemma.sudoku_task.sudoku_model_config()` (or `--init FOLDER`), writes a Hugging
Face-layout checkpoint into --out (config.json, generation_config.json, model.safetensors with LoRA merged,
tokenizer.json) that `dgemma.load(OUT, backend="cuda")` runs, plus train_state.pt (resumable) and, with LoRA, the
adapters alone in OUT/adapter/ (PEFT names).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dgemma.backends.cuda.train import (LORA_TARGETS, TrainConfig, Trainer, export_hf, load_model, new_model,
                                        save_lora, solve_rate)
from dgemma.sudoku import generate_dataset
from dgemma.sudoku_task import (CANVAS_LENGTH, encode_batch, sudoku_generation_config, sudoku_model_config,
                                write_tokenizer)


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
    ap.add_argument("--difficulty", default="easy", help="easy, medium, hard, or LO,HI givens")
    ap.add_argument("--train-size", type=int, default=5000)
    ap.add_argument("--eval-size", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--solve-eval", type=int, default=0, help="also measure the solve rate on this many held-out "
                    "puzzles at each evaluation (full dgemma generation with the Sudoku checker)")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--canvas-length", type=int, default=CANVAS_LENGTH)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "train_state.pt"
    difficulty = tuple(int(x) for x in args.difficulty.split(",")) if "," in args.difficulty else args.difficulty

    if args.init:
        model, config = load_model(args.init, device=args.device)
        config = dict(config)
    else:
        config = sudoku_model_config(hidden_size=args.hidden, num_hidden_layers=args.layers,
                                     intermediate_size=2 * args.hidden, canvas_length=args.canvas_length)
        model = new_model(config, seed=args.seed, device=args.device)
    canvas = int(config["canvas_length"])

    t0 = time.perf_counter()
    train_pairs = generate_dataset(args.train_size, difficulty, seed=args.seed)
    eval_pairs = generate_dataset(args.eval_size, difficulty, seed=args.seed + 1_000_003)
    print(f"data: {len(train_pairs)} train / {len(eval_pairs)} held-out {args.difficulty} puzzles "
          f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    prompts, targets = encode_batch(train_pairs, canvas)
    eval_prompts, eval_targets = encode_batch(eval_pairs, canvas)
    eval_blanks = np.array([[c == "." for c in p] for p, _ in eval_pairs])

    cfg = TrainConfig(lr=args.lr, batch=args.batch, steps=args.steps, seed=args.seed, warmup_steps=args.warmup,
                      lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                      lora_targets=tuple(t for t in args.lora_targets.split(",") if t),
                      eval_every=args.eval_every, save_every=args.save_every, device=args.device,
                      weight_decay=0.0 if args.lora_rank else 0.01)
    trainer = Trainer(model, cfg, model_config=config)
    if args.resume:
        if not state_file.exists():
            ap.error(f"--resume: {state_file} does not exist")
        print(f"resumed from {state_file} at step {trainer.load(state_file)}", file=sys.stderr)
    n_train = sum(p.numel() for p in trainer.params)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"model: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.3f}M trainable", file=sys.stderr)

    gen_cfg = sudoku_generation_config(canvas)

    def evaluate(tr: Trainer) -> dict:
        res = tr.one_step_accuracy(eval_prompts, eval_targets, blanks=eval_blanks)
        if args.solve_eval:
            export_hf(tr.model, out, config, gen_cfg, write_tokenizer)
            res.update(solve_rate(out, eval_pairs[: args.solve_eval], device=args.device))
        return res

    log_file = (out / "log.jsonl").open("a")

    def log(parts: dict) -> None:
        log_file.write(json.dumps(parts) + "\n")
        if any(k.startswith("eval/") for k in parts):
            print(f"step {parts['step']}: loss {parts['loss']:.4f} " + " ".join(
                f"{k[5:]} {v:.3f}" for k, v in parts.items() if k.startswith("eval/")), file=sys.stderr)

    trainer.fit(prompts, targets, args.steps, checkpoint=str(state_file), evaluate=evaluate,
                progress=not args.no_progress, log=log)
    log_file.close()
    export_hf(trainer.model, out, config, gen_cfg, write_tokenizer)
    if args.lora_rank:
        save_lora(trainer.model, out / "adapter")
    final = trainer.one_step_accuracy(eval_prompts, eval_targets, blanks=eval_blanks)
    last = trainer.history[-1] if trainer.history else {}
    print(json.dumps({"step": trainer.step, "loss": last.get("loss"), **final, "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
