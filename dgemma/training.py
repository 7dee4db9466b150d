"""The backend-neutral half of the fine-tuning recipe: its settings, learning-rate schedule, training loop, the LoRA
adapter file format (PEFT's names) and checkpoint export. `backends/cuda/train.py` and `backends/mlx/train.py`
implement the framework half (the objective, the optimizer step, LoRA layers) and share everything here, so a run
resumes, exports and trades adapters the same way on either backend. Imports neither torch nor mlx."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    lr: float = 1.5e-4
    batch: int = 16
    steps: int = 2000
    seed: int = 0
    warmup_steps: int = 0
    decay_steps: int = 0                  # > 0: cosine decay from lr to lr * min_lr_ratio over this many steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    lora_rank: int = 0                    # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    self_conditioning_p: float = 0.5
    encoder_loss_weight: float = 1.0
    encoder_sees_target: bool = False     # encoder next-token loss over prompt + clean target (KV still prompt-only)
    eval_every: int = 0                   # 0: no periodic evaluation
    save_every: int = 0                   # 0: only at the end
    device: str | None = None             # the backend's device ("cpu", "cuda", "gpu"); None: its default

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)


def step_seed(seed: int, step: int) -> int:
    """The seed of step `step`'s batch (and noise): a run is a pure function of (seed, step), hence resumable."""
    return (int(seed) * 1_000_003 + int(step) * 7919 + 17) % (2**63)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over cfg.warmup_steps, then constant or (decay_steps > 0) cosine down to lr * min_lr_ratio."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay_steps > 0:
        frac = min(1.0, max(0, step - cfg.warmup_steps) / cfg.decay_steps)
        floor = cfg.min_lr_ratio
        return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))
    return cfg.lr


class TrainLoop:
    """The loop both backends' Trainers share. A subclass provides `cfg` (TrainConfig), `step`, `history`,
    `train_step(prompts, targets) -> dict` and `save(path)`, and may override `evaluating()` (a context around
    evaluation, e.g. eval mode)."""

    def lr_at(self, step: int) -> float:
        return learning_rate(self.cfg, step)

    def evaluating(self):
        return contextlib.nullcontext()

    def fit(self, prompts: np.ndarray | None, targets: np.ndarray | None, steps: int | None = None, *,
            checkpoint: str | None = None, evaluate=None, progress: bool = True, log=None, batch_fn=None,
            on_save=None) -> list[dict]:
        """Train until `steps` (total, counting steps already done) on batches sampled from (prompts, targets), or
        made by `batch_fn(step, rng) -> (prompts, targets)` (rng a numpy Generator seeded from (seed, step), so a
        resumed run sees the same batches); `evaluate(trainer) -> dict` runs every cfg.eval_every steps; the
        checkpoint is saved every cfg.save_every steps and at the end, then `on_save(trainer)` is called."""
        from tqdm.auto import tqdm

        steps = self.cfg.steps if steps is None else steps
        n = 0 if prompts is None else len(prompts)
        bar = tqdm(total=steps, initial=self.step, desc="train", unit="step", disable=not progress, leave=False)
        t0, done0 = time.perf_counter(), self.step

        def save():
            self.save(checkpoint)
            if on_save is not None:
                on_save(self)

        while self.step < steps:
            rng = np.random.default_rng(step_seed(self.cfg.seed, self.step))
            if batch_fn is not None:
                batch_prompts, batch_targets = batch_fn(self.step, rng)
            else:
                idx = rng.choice(n, size=self.cfg.batch, replace=n < self.cfg.batch)
                batch_prompts, batch_targets = prompts[idx], targets[idx]
            parts = self.train_step(batch_prompts, batch_targets)
            parts["steps_per_s"] = (self.step - done0) / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.3f}", acc=f"{parts['canvas_acc']:.3f}")
            if evaluate is not None and self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
                with self.evaluating():
                    parts.update({"eval/" + k: v for k, v in evaluate(self).items()})
            if log is not None:
                log(parts)
            if checkpoint and self.cfg.save_every and self.step % self.cfg.save_every == 0:
                save()
        bar.close()
        if checkpoint:
            save()
        return self.history


# ----------------------------------------------------------------------------------------------------------------
# LoRA adapter files: PEFT's tensor names and adapter_config, one safetensors file or PEFT's folder layout
# ----------------------------------------------------------------------------------------------------------------


# dgemma.adapters holds the adapter format (PEFT's names and adapter_config); re-exported for the recipes.
from .adapters import (adapter_config, adapter_file, check_adapter_names, peft_key, peft_tensors,  # noqa: E402,F401
                       read_adapter_config, write_adapter)


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------


def write_checkpoint(folder: str | os.PathLike, config: dict, generation_config: dict | None,
                     tensors: dict[str, np.ndarray], write_tokenizer=None) -> Path:
    """A checkpoint folder `dgemma.load(folder)` reads on either backend: config.json (dtype float32),
    generation_config.json, model.safetensors (written to a temporary name, then renamed) and the tokenizer files
    through `write_tokenizer(folder)`."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(config, dtype="float32"), indent=2))
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    tmp = folder / "model.safetensors.tmp"
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    if write_tokenizer is not None:
        write_tokenizer(folder)
    return folder
