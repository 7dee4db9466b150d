"""A quality yardstick for text models on held-out text, the same computation on every backend and format.

What it measures (`measure`):
- the denoising loss at fixed noise levels (default t = 0.25, 0.5, 0.75): held-out examples (a prompt, the canvas
  after it; `dgemma.training.text_batch` from fixed seeds) whose canvas tokens are each replaced by a uniform random
  token with probability t (`dgemma.training.corrupt_tokens`, one fixed seed per level), one decoder pass over the
  noisy canvas (no self-conditioning: the sampler's first step), and the mean cross-entropy of the clean canvas
  under its logits, with the argmax accuracy on the replaced positions. Every draw is made here on the host with
  numpy, so both backends see exactly the same corruption, and the sums are taken in float64 on the host: the
  numbers differ between backends by float32 rounding of the logits only.
- generation under the checkpoint's own sampler (generation_config.json): held-out prompts with fixed noise
  (`dgemma.sampler.ScriptedNoise`: host draws, identical on every backend), the tokens per forward (generated
  non-pad tokens over decoder passes, over all prompts) and the mean steps per canvas. Its tokens are kept, so
  `agreement` can compare a quantized model's generations with the float model's.

Only the `dgemma.Model` API is used (prefill, denoise, generate_batch with noise over the backend's ops), so a
quantized or converted checkpoint is measured as it runs. The held-out documents live beside the model
(heldout.jsonl, written by examples/text/train.py); a converted copy is measured with the float folder's documents
(`heldout_documents`).
Imports neither torch nor mlx.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .sampler import ScriptedNoise
from .training import corrupt_tokens, text_batch

NOISE_LEVELS = (0.25, 0.5, 0.75)
HELD_OUT_FILE = "heldout.jsonl"
EXAMPLE_SEED = 20_261_201       # the held-out examples' draws (documents, cuts)
NOISE_SEED = 7                  # the corruption at level i is drawn from default_rng([NOISE_SEED, i])


@dataclass
class Yardstick:
    loss: dict[float, float]                    # t -> mean canvas cross-entropy (nats per token)
    accuracy: dict[float, float]                # t -> argmax accuracy on the replaced positions
    tokens_per_forward: float
    steps_per_canvas: float
    generated_tokens: int
    tokens: list[list[int]] = field(repr=False, default_factory=list)   # each prompt's generated tokens

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("tokens")
        out["loss"] = {str(k): v for k, v in self.loss.items()}
        out["accuracy"] = {str(k): v for k, v in self.accuracy.items()}
        return out


def heldout_documents(folder: str | Path) -> list[str]:
    """The held-out documents shipped beside a text model (heldout.jsonl: one {"text": ...} per line)."""
    path = Path(folder) / HELD_OUT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (the yardstick needs a text model's held-out documents)")
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _special(model) -> dict:
    """The ids of <bos>, <eos> and <pad> in the model's tokenizer (examples/text/train.py's prompt format)."""
    ids = {name: model.tokenizer.token_to_id(token) for name, token in
           (("bos", "<bos>"), ("eos", "<eos>"), ("pad", "<pad>"))}
    if any(v is None for v in ids.values()):
        raise ValueError(f"the tokenizer lacks <bos>/<eos>/<pad> ({ids}): not a dgemma text model")
    return ids


def heldout_examples(model, docs: list[str], n: int = 32, prompt_tokens: int = 64,
                     seed: int = EXAMPLE_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompts [n, P] left-padded, targets [n, C], prompt_valid [n, P]) cut from `docs` with fixed draws; C is the
    model's canvas length."""
    return text_batch(model.tokenizer, docs, np.random.default_rng(seed), n, prompt_tokens,
                      model.config.canvas_length, prompt_tokens=prompt_tokens, **_special(model))


def noisy_canvas(targets: np.ndarray, t: float, level: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed corruption of noise level number `level` (probability t per token): (noisy, replaced)."""
    return corrupt_tokens(targets, np.full(len(targets), t), vocab_size, np.random.default_rng([NOISE_SEED, level]))


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-position cross-entropy [B, C] of float logits [B, C, V], in float64."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(-1, keepdims=True)
    log_z = np.log(np.exp(x - top).sum(-1)) + top[..., 0]
    return log_z - np.take_along_axis(x, targets[..., None], -1)[..., 0]


def denoising_loss(model, prompts, targets, valid, levels=NOISE_LEVELS) -> tuple[dict, dict]:
    """({t: mean cross-entropy}, {t: accuracy on replaced positions}) of one decoder pass per noise level."""
    state = model.prefill(prompts, valid)
    losses, accs = {}, {}
    for i, t in enumerate(levels):
        noisy, replaced = noisy_canvas(targets, t, i, model.config.vocab_size)
        logits = np.asarray(model.denoise(state, noisy), dtype=np.float32)
        losses[float(t)] = float(cross_entropy(logits, targets).mean())
        hit = logits.argmax(-1) == targets
        accs[float(t)] = float(hit[replaced].mean()) if replaced.any() else float("nan")
    return losses, accs


def generation_stats(model, prompts: list[list[int]], seed: int = 0, **sampler) -> tuple[float, float, int, list]:
    """(tokens per forward over all prompts, mean steps per canvas, generated tokens, each prompt's tokens) under
    the checkpoint's sampler (overridden by `sampler`). Prompt i's noise is `ScriptedNoise(seed + i)`: host draws,
    the same on every backend, so backends differ only where float rounding flips a sampled token."""
    noises = [ScriptedNoise(seed + i, model.backend.ops) for i in range(len(prompts))]
    gens = model.generate_batch(prompts, noises=noises, **sampler)
    passes = sum(g.stats.decoder_passes for g in gens)
    non_pad = sum(g.stats.tokens_per_forward * g.stats.decoder_passes for g in gens)
    steps = [s for g in gens for s in g.stats.steps_per_canvas]
    return (non_pad / passes if passes else 0.0, float(np.mean(steps)) if steps else 0.0,
            sum(len(g.token_ids) for g in gens), [list(g.token_ids) for g in gens])


def measure(model, docs: list[str] | None = None, *, n_loss: int = 32, n_generate: int = 8,
            generate_prompt_tokens: int = 16, levels=NOISE_LEVELS, seed: int = 0, **sampler) -> Yardstick:
    """The yardstick of a loaded text model (`dgemma.load`): denoising losses on `n_loss` held-out examples and
    generation from `n_generate` held-out prompts of `generate_prompt_tokens` tokens. `docs` defaults to the
    model folder's heldout.jsonl."""
    docs = heldout_documents(model.checkpoint.path) if docs is None else docs
    prompts, targets, valid = heldout_examples(model, docs, n_loss)
    loss, acc = denoising_loss(model, prompts, targets, valid, levels)
    gp, _, gv = heldout_examples(model, docs, n_generate, generate_prompt_tokens, seed=EXAMPLE_SEED + 1)
    tpf, spc, n_tokens, tokens = generation_stats(model, [list(r[v]) for r, v in zip(gp, gv)], seed, **sampler)
    return Yardstick(loss, acc, tpf, spc, n_tokens, tokens)


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """The fraction of the reference's generated tokens that `tokens` matches position by position (a missing
    position counts as a mismatch, extra positions are ignored)."""
    total = sum(len(r) for r in reference)
    same = sum(sum(a == b for a, b in zip(t, r)) for t, r in zip(tokens, reference))
    return same / total if total else 1.0
