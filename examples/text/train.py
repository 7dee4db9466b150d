"""Train a small DiffusionGemma-architecture text model with the block-diffusion objective.

    python examples/text/corpus.py /tmp/pydoc --out runs/text-data        # the corpus and its tokenizer
    python examples/text/train.py --data runs/text-data --out runs/text --steps 3000
    python examples/text/train.py --data runs/text-data --out runs/text --steps 4000 --resume

The recipe is the Sudoku one (dgemma/training.py, DESIGN.md section 3) on plain text: each example cuts a training
document at a word boundary (`dgemma.training.text_batch`); the prompt is <bos> and up to --prompt-tokens tokens
before the cut, the target the next --canvas-length tokens (<eos> and <pad>s where the document ends). t ~ U(0, 1),
each target token replaced by a uniform random token with probability t, the decoder's cross-entropy over the
canvas plus the encoder's next-token loss over the prompt (times --encoder-loss-weight), self-conditioning with
probability 0.5. A generation continues canvas after canvas (each committed through the encoder), which is what
prompts of up to --prompt-tokens tokens train: a prompt plus the canvases already written.

Writes into --out a checkpoint `dgemma.load(OUT)` runs on either backend (config.json with "dgemma_task": "text",
generation_config.json, model.safetensors, the tokenizer files, heldout.jsonl for `dgemma.quality`), plus
train_state.pt (train_state.safetensors with --backend mlx) to resume from, and log.jsonl. Every --eval-every steps:
the objective on a fixed held-out batch (fixed noise) and, with --sample, a generation from "The ".
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from dgemma.tokenizer import Tokenizer
from dgemma.training import sampler_generation_config, small_model_config
from dgemma.training import text_batch

PAD, EOS, BOS = 0, 1, 2
HELD_OUT_CHARS = 6000          # of each held-out document kept beside the model (dgemma.quality reads them)


def text_model_config(vocab_size: int, hidden_size: int = 128, num_hidden_layers: int = 4, num_experts: int = 8,
                      top_k_experts: int = 2, moe_intermediate_size: int = 128, intermediate_size: int = 256,
                      num_attention_heads: int = 4, head_dim: int = 32, canvas_length: int = 64,
                      sliding_window: int = 128) -> dict:
    """config.json of a small DiffusionGemma-architecture text model: sliding-window layers with one full-attention
    layer last (as the reference forces), MoE plus a dense MLP in every layer, tied soft-capped logits,
    self-conditioning. The window (128 tokens) is shorter than a prompt plus canvas, so the sliding layers do see
    less than the full one."""
    return small_model_config(
        vocab_size=vocab_size, task="text", note="text model (examples/text/train.py)", hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers, num_experts=num_experts, top_k_experts=top_k_experts,
        moe_intermediate_size=moe_intermediate_size, intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads, head_dim=head_dim, canvas_length=canvas_length,
        sliding_window=sliding_window, max_position_embeddings=4096, pad=PAD, eos=EOS, bos=BOS)


def text_generation_config(canvas_length: int, canvases: int = 3, max_denoising_steps: int = 32) -> dict:
    """generation_config.json: `canvases` canvases of new tokens by default, the released sampler's other settings."""
    return sampler_generation_config(canvases * canvas_length, max_denoising_steps, pad=PAD, eos=EOS)


def read_documents(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def tokenizer_writer(data: Path):
    """write_tokenizer(folder): the corpus's tokenizer.json, its tokenizer_config.json, and the held-out documents
    (their first HELD_OUT_CHARS characters) as heldout.jsonl, which `dgemma.quality` reads."""
    def write(folder) -> None:
        folder = Path(folder)
        shutil.copyfile(data / "tokenizer.json", folder / "tokenizer.json")
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2))
        with (folder / "heldout.jsonl").open("w", encoding="utf-8") as f:
            for line in (data / "heldout.jsonl").read_text(encoding="utf-8").splitlines():
                doc = json.loads(line)
                f.write(json.dumps({"source": doc["source"], "text": doc["text"][:HELD_OUT_CHARS]},
                                   ensure_ascii=False) + "\n")
    return write


def sample(folder: Path, backend: str, device: str | None) -> str:
    """A generation from "The " with the folder's checkpoint; a failure is reported in its place (a sample is a
    look at the model, not worth stopping a training run for)."""
    import dgemma

    try:
        return dgemma.load(folder, backend=backend, device=device).generate("The ", seed=0).text
    except Exception as e:  # noqa: BLE001
        return f"(no sample: {type(e).__name__}: {e})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder from examples/text/corpus.py (corpus.jsonl, heldout.jsonl, "
                    "tokenizer.json)")
    ap.add_argument("--out", required=True, help="output folder (checkpoint + train state)")
    ap.add_argument("--steps", type=int, default=3000, help="total optimizer steps (a resumed run counts earlier ones)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--decay-steps", type=int, default=0, help="cosine decay over this many steps (0: --steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="continue from OUT's train state")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--canvas-length", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128, help="longest prompt trained on (tokens, <bos> included)")
    ap.add_argument("--encoder-loss-weight", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-size", type=int, default=64)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--sample", action="store_true", help="at each evaluation also generate from 'The '")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--backend", choices=["cuda", "mlx"], default="cuda",
                    help="cuda: PyTorch (GPU if available, else CPU); mlx: MLX")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    data, out = Path(args.data), Path(args.out)
    for name in ("corpus.jsonl", "heldout.jsonl", "tokenizer.json"):
        if not (data / name).exists():
            ap.error(f"--data: {data / name} does not exist (run examples/text/corpus.py first)")
    out.mkdir(parents=True, exist_ok=True)
    recipe = importlib.import_module(f"dgemma.backends.{args.backend}.train")
    if args.backend == "cuda":
        import torch

        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.threads:
            torch.set_num_threads(args.threads)
        state_file, load_kw = out / "train_state.pt", {"device": args.device}
    else:
        state_file, load_kw = out / "train_state.safetensors", {}

    tokenizer = Tokenizer.from_folder(data)
    docs, held = read_documents(data / "corpus.jsonl"), read_documents(data / "heldout.jsonl")
    config = text_model_config(tokenizer.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                               num_experts=args.experts, canvas_length=args.canvas_length)
    gen_cfg = text_generation_config(args.canvas_length)
    model = recipe.new_model(config, seed=args.seed, **load_kw)
    write_tokenizer = tokenizer_writer(data)
    special = dict(bos=BOS, eos=EOS, pad=PAD)
    eval_batch = text_batch(tokenizer, held, np.random.default_rng(10_000 + args.seed), args.eval_size,
                            args.prompt_tokens, args.canvas_length, prompt_tokens=args.prompt_tokens // 2, **special)

    def batch_fn(step: int, rng: np.random.Generator):
        return text_batch(tokenizer, docs, rng, args.batch, args.prompt_tokens, args.canvas_length, **special)

    cfg = recipe.TrainConfig(lr=args.lr, batch=args.batch, steps=args.steps, seed=args.seed, warmup_steps=args.warmup,
                             decay_steps=args.decay_steps or args.steps, eval_every=args.eval_every,
                             save_every=args.save_every, device=args.device, weight_decay=0.01,
                             encoder_loss_weight=args.encoder_loss_weight)
    trainer = recipe.Trainer(model, cfg, model_config=config)
    if args.resume:
        if not state_file.exists():
            ap.error(f"--resume: {state_file} does not exist")
        print(f"resumed from {state_file} at step {trainer.load(state_file)}", file=sys.stderr)
    if args.backend == "cuda":
        n_all = sum(p.numel() for p in model.parameters())
    else:
        from mlx.utils import tree_flatten

        n_all = sum(v.size for _, v in tree_flatten(model.parameters()))
    chars = sum(len(d) for d in docs)
    print(f"model: {n_all / 1e6:.2f}M parameters; data: {len(docs)} documents, {chars / 1e6:.2f}M characters "
          f"({len(held)} held out)", file=sys.stderr)

    def export(tr) -> None:
        recipe.export_hf(tr.model, out, config, gen_cfg, write_tokenizer)

    def evaluate(tr) -> dict:
        prompts, targets, valid = eval_batch
        res = {"heldout_loss": tr.eval_loss(prompts, targets, prompt_valid=valid),
               "minutes": (time.perf_counter() - t_train) / 60}
        if args.sample:
            export(tr)
            res["sample"] = sample(out, args.backend, args.device)
        return res

    log_file = (out / "log.jsonl").open("a")

    def log(parts: dict) -> None:
        log_file.write(json.dumps(parts) + "\n")
        log_file.flush()
        if "eval/heldout_loss" in parts:
            print(f"step {parts['step']}: loss {parts['loss']:.4f} (decoder {parts['decoder']:.4f}, encoder "
                  f"{parts['encoder']:.4f}) held-out {parts['eval/heldout_loss']:.4f} "
                  f"[{parts['eval/minutes']:.1f} min]", file=sys.stderr)
            if "eval/sample" in parts:
                print("  sample: " + json.dumps(parts["eval/sample"][:300]), file=sys.stderr)

    t_train = time.perf_counter()
    trainer.fit(None, None, args.steps, checkpoint=str(state_file), evaluate=evaluate, progress=not args.no_progress,
                log=log, batch_fn=batch_fn, on_save=export)
    log_file.close()
    export(trainer)
    prompts, targets, valid = eval_batch
    last = trainer.history[-1] if trainer.history else {}
    print(json.dumps({"step": trainer.step, "loss": last.get("loss"), "decoder": last.get("decoder"),
                      "encoder": last.get("encoder"),
                      "heldout_loss": trainer.eval_loss(prompts, targets, prompt_valid=valid), "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
