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


def noise_rng(seed: int, step: int) -> np.random.Generator:
    """Step `step`'s noise generator: a stream apart from the batch sampler's (seeded from the same (seed, step)).
    Both backends draw a step's noise from it (`draw_noise`), so one seed trains the same on either."""
    return np.random.default_rng([step_seed(seed, step), 1])


def corrupt_tokens(targets: np.ndarray, t: np.ndarray, vocab_size: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Replace each token of `targets` [B, C] by a uniform random token with probability t[b]; (noisy, replaced)."""
    targets = np.asarray(targets)
    u = rng.random(targets.shape)
    rand = rng.integers(0, vocab_size, targets.shape)
    replaced = u < np.asarray(t, dtype=np.float64)[:, None]
    return np.where(replaced, rand, targets).astype(targets.dtype), replaced


def draw_schedule(batch: int, cfg: TrainConfig, rng: np.random.Generator, t=None,
                  sc_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """A batch's first draws: t [B] ~ U(0, 1) (float32), then the self-conditioning coins [B] (probability
    cfg.self_conditioning_p); a given `t` or `sc_mask` is used as is, and is then not drawn."""
    if t is None:
        t = rng.random(batch).astype(np.float32)
    if sc_mask is None:
        sc_mask = rng.random(batch) < cfg.self_conditioning_p
    return np.asarray(t, dtype=np.float32), np.asarray(sc_mask, dtype=bool)


def draw_noise(targets, cfg: TrainConfig, vocab_size: int, rng: np.random.Generator | None = None,
               t=None, sc_mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One batch's randomness, on the host, in this order: `draw_schedule`, then the corruption
    (`corrupt_tokens`). Returns (t, sc_mask, noisy, replaced)."""
    rng = np.random.default_rng() if rng is None else rng
    targets = np.asarray(targets)
    t, sc_mask = draw_schedule(targets.shape[0], cfg, rng, t, sc_mask)
    noisy, replaced = corrupt_tokens(targets, t, vocab_size, rng)
    return t, sc_mask, noisy, replaced


@dataclass
class ObjectiveInputs:
    """The host-side half of one batch's objective: what the passes read, and the masks and indices that say which
    positions count, so each backend's `diffusion_objective` is only the framework's forward passes."""
    enc_ids: np.ndarray            # [B, T] the encoder's input: the prompt, or prompt + clean target
    enc_valid: np.ndarray          # [B, T] bool: False at left padding
    cache_length: int              # P: the decoder reads the cache of the prompt only
    next_token_weight: np.ndarray  # [B, T - 1] float32: 1 / (number of pairs) where tokens i and i + 1 are real
    sc_rows: np.ndarray            # [S] the rows that get a self-conditioning first pass
    sc_index: np.ndarray           # [B] int32: row b's place among sc_rows, S for rows without self-conditioning


def objective_inputs(prompts, targets, sc_mask, cfg: TrainConfig, prompt_valid=None) -> ObjectiveInputs:
    """`ObjectiveInputs` of a batch (host arrays: prompts [B, P], targets [B, C], sc_mask [B])."""
    prompts, targets = np.asarray(prompts), np.asarray(targets)
    sc_mask = np.asarray(sc_mask, dtype=bool)
    B, P = prompts.shape
    valid = np.ones((B, P), dtype=bool) if prompt_valid is None else np.asarray(prompt_valid, dtype=bool)
    if cfg.encoder_sees_target:
        enc_ids = np.concatenate([prompts, targets], axis=1)
        valid = np.concatenate([valid, np.ones(targets.shape, dtype=bool)], axis=1)
    else:
        enc_ids = prompts
    pairs = (valid[:, 1:] & valid[:, :-1]).astype(np.float32)
    rows = np.flatnonzero(sc_mask)
    index = np.where(sc_mask, np.cumsum(sc_mask) - 1, len(rows)).astype(np.int32)
    return ObjectiveInputs(enc_ids, valid, P, pairs / max(float(pairs.sum()), 1.0), rows, index)


def diffusion_objective(passes, inputs: ObjectiveInputs, noisy, targets, cfg: TrainConfig):
    """The objective for given noise (DESIGN.md section 3), the same steps on every backend: the encoder over
    `inputs.enc_ids` (the decoder reads the cache of its first `cache_length` positions) with its next-token loss;
    a first decoder pass without self-conditioning on the rows `inputs.sc_rows` (no gradient), whose softmax
    self-conditions those rows of the training pass (the others get zeros: no self-conditioning); the decoder's
    cross-entropy over the whole canvas. `passes` is the backend's forward passes: encode(ids, valid,
    cache_length) -> (state, hidden); next_token_loss(hidden, ids, weight) -> sum of weighted CE;
    first_pass(noisy, state, rows, index) -> softmax [B, C, V]; decode(noisy, state, sc_probs) -> logits;
    canvas_loss(logits, targets) -> (mean CE, accuracy). Returns (loss, {"decoder", "encoder", "canvas_acc"})."""
    state, hidden = passes.encode(inputs.enc_ids, inputs.enc_valid, inputs.cache_length)
    enc_loss = passes.next_token_loss(hidden, inputs.enc_ids, inputs.next_token_weight)
    sc_probs = None
    if len(inputs.sc_rows):
        sc_probs = passes.first_pass(noisy, state, inputs.sc_rows, inputs.sc_index)
    logits = passes.decode(noisy, state, sc_probs)
    dec_loss, acc = passes.canvas_loss(logits, targets)
    return dec_loss + cfg.encoder_loss_weight * enc_loss, {"decoder": dec_loss, "encoder": enc_loss,
                                                           "canvas_acc": acc}


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
    `train_step(prompts, targets, prompt_valid=None) -> dict` and `save(path)`, and may override `evaluating()` (a
    context around evaluation, e.g. eval mode)."""

    def lr_at(self, step: int) -> float:
        return learning_rate(self.cfg, step)

    def evaluating(self):
        return contextlib.nullcontext()

    def fit(self, prompts: np.ndarray | None, targets: np.ndarray | None, steps: int | None = None, *,
            checkpoint: str | None = None, evaluate=None, progress: bool = True, log=None, batch_fn=None,
            on_save=None) -> list[dict]:
        """Train until `steps` (total, counting steps already done) on batches sampled from (prompts, targets), or
        made by `batch_fn(step, rng) -> (prompts, targets)` or `(prompts, targets, prompt_valid)` for left-padded
        prompts (rng a numpy Generator seeded from (seed, step), so a resumed run sees the same batches);
        `evaluate(trainer) -> dict` runs every cfg.eval_every steps; the checkpoint is saved every cfg.save_every
        steps and at the end, then `on_save(trainer)` is called."""
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
            extra = {}
            if batch_fn is not None:
                batch_prompts, batch_targets, *valid = batch_fn(self.step, rng)
                if valid:  # a third array: which prompt positions are tokens (False: left padding)
                    extra["prompt_valid"] = valid[0]
            else:
                idx = rng.choice(n, size=self.cfg.batch, replace=n < self.cfg.batch)
                batch_prompts, batch_targets = prompts[idx], targets[idx]
            parts = self.train_step(batch_prompts, batch_targets, **extra)
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
# Text: the recipe on plain documents (examples/text/train.py, dgemma.quality)
# ----------------------------------------------------------------------------------------------------------------


def text_split_point(doc: str, rng: np.random.Generator) -> int:
    """A character position to cut a document at, between a prompt and its continuation: at a word boundary,
    before or (as often) after the space, so prompts ending in a space (what people type: "The ") are trained
    on; one cut in ten is at the document's start (the prompt is <bos> alone)."""
    if rng.random() < 0.1:
        return 0
    at = int(rng.integers(0, len(doc)))
    space = doc.find(" ", at)
    if space < 0:
        return len(doc)
    return space + 1 if rng.random() < 0.5 else space


def text_example(tokenizer, doc: str, split: int, prompt_tokens: int, canvas_length: int, *, bos: int, eos: int,
                 pad: int) -> tuple[list[int], list[int]]:
    """(prompt, target) ids for a document cut at `split`: the prompt is <bos> then the last `prompt_tokens` - 1
    tokens of the text before the cut (fewer at a document's start), the target the first `canvas_length` tokens
    after it, then <eos> and <pad>s where the document ends. Prompt and continuation are tokenized apart, as a
    prompt is at generation. `tokenizer.encode(text, add_special_tokens=False)` gives ids."""
    before = tokenizer.encode(doc[max(0, split - 8 * prompt_tokens):split], add_special_tokens=False) if split else []
    prompt = [bos] + before[max(0, len(before) - (prompt_tokens - 1)):]
    end, target = split, []
    while len(target) < canvas_length and end < len(doc):
        end = min(len(doc), end + 8 * canvas_length)
        target = tokenizer.encode(doc[split:end], add_special_tokens=False)
    if len(target) < canvas_length:
        target = target + [eos]
    target = (target + [pad] * canvas_length)[:canvas_length]
    return prompt, target


def left_pad(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, T], valid [B, T]) of token rows left-padded to the longest."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    valid = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        valid[i, width - len(r):] = True
    return ids, valid


def text_batch(tokenizer, docs: list[str], rng: np.random.Generator, batch: int, max_prompt_tokens: int,
               canvas_length: int, *, bos: int, eos: int, pad: int,
               prompt_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch of text examples (prompts [B, P] left-padded, targets [B, C], prompt_valid [B, P]): documents drawn
    in proportion to their length, cut by `text_split_point`; one prompt length for the batch (drawn from
    2..max_prompt_tokens unless `prompt_tokens` is given), so only rows near a document's start are padded."""
    lengths = np.array([len(d) for d in docs], dtype=np.float64)
    n_prompt = int(prompt_tokens or rng.integers(2, max_prompt_tokens + 1))
    prompts, targets = [], []
    for d in rng.choice(len(docs), size=batch, p=lengths / lengths.sum()):
        doc = docs[int(d)]
        p, t = text_example(tokenizer, doc, text_split_point(doc, rng), n_prompt, canvas_length, bos=bos, eos=eos,
                            pad=pad)
        prompts.append(p)
        targets.append(t)
    ids, valid = left_pad(prompts, pad)
    return ids, np.array(targets, dtype=np.int64), valid


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


def small_model_config(*, vocab_size: int, task: str, note: str, hidden_size: int, num_hidden_layers: int,
                       num_experts: int, top_k_experts: int, moe_intermediate_size: int, intermediate_size: int,
                       num_attention_heads: int, head_dim: int, canvas_length: int, sliding_window: int,
                       max_position_embeddings: int, dtype: str = "float32", pad: int = 0, eos: int = 1,
                       bos: int = 2) -> dict:
    """config.json of a small DiffusionGemma-architecture model this project trains (the Sudoku and text models):
    sliding-window layers with one full-attention layer last (as the reference forces), MoE plus a dense MLP in
    every layer, tied soft-capped logits, self-conditioning; `task` is what the checkpoint declares."""
    n = num_hidden_layers
    text = {
        "model_type": "diffusion_gemma_text", "vocab_size": vocab_size, "hidden_size": hidden_size,
        "intermediate_size": intermediate_size, "num_hidden_layers": n, "num_attention_heads": num_attention_heads,
        "num_key_value_heads": max(1, num_attention_heads // 2), "head_dim": head_dim,
        "layer_types": ["sliding_attention"] * (n - 1) + ["full_attention"],
        "per_layer_config": {str(n - 1): {"head_dim": 2 * head_dim, "num_key_value_heads": 1}},
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        },
        "sliding_window": sliding_window, "rms_norm_eps": 1e-6, "num_experts": num_experts,
        "top_k_experts": top_k_experts, "moe_intermediate_size": moe_intermediate_size,
        "max_position_embeddings": max_position_embeddings, "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": 30.0, "pad_token_id": pad, "eos_token_id": eos, "bos_token_id": bos,
        "tie_word_embeddings": True, "use_bidirectional_attention": None, "attention_bias": False,
        "attention_dropout": 0.0,
    }
    return {"architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
            "canvas_length": canvas_length, "dtype": dtype, "eos_token_id": [eos], "pad_token_id": pad,
            "tie_word_embeddings": True, "text_config": text, "dgemma_task": task, "_dgemma_note": note}


def sampler_generation_config(max_new_tokens: int, max_denoising_steps: int = 32, pad: int = 0,
                              eos: int = 1) -> dict:
    """generation_config.json with the released sampler's settings (entropy bound 0.1, temperature 0.8 -> 0.4,
    stability 1, confidence 0.005)."""
    return {"max_denoising_steps": max_denoising_steps,
            "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
            "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1, "confidence_threshold": 0.005,
            "eos_token_id": [eos], "pad_token_id": pad, "max_new_tokens": max_new_tokens}
