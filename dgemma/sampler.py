"""The entropy-bound denoising sampler, written once over `ArrayOps` so it runs on every backend's device arrays.

Semantics follow transformers' `generation_diffusion_gemma.py` (our oracle): linear temperature schedule over the
steps remaining, categorical sample, entropy-bound acceptance (arXiv:2505.24857), uniform re-noise of the rest, and the
stable-and-confident stopping rule. One difference in cost, none in result: the reference takes three softmaxes of the
(B, C, V) logits per step (sampling, acceptance, stopping) and a fourth for self-conditioning; we take one
log-softmax and reuse it for all four.
"""

from __future__ import annotations

import numpy as np

from .backend import ArrayOps

FLOAT32_MIN = float(np.finfo(np.float32).min)


def temperature(steps_remaining: int, max_steps: int, t_min: float, t_max: float) -> float:
    """t = t_min + (t_max - t_min) * k / N, in float32 as the reference computes it (k is an int32 tensor there)."""
    ratio = np.float32(steps_remaining) / np.float32(max_steps)
    return float(np.float32(t_min) + np.float32(t_max - t_min) * ratio)


def entropy_from_log_probs(ops: ArrayOps, log_probs, probs):
    """Shannon entropy per position, computed as torch.distributions.Categorical does (clamped log-probs)."""
    return ops.entropy(log_probs, probs)


def entropy_bound_accept(ops: ArrayOps, entropy, bound: float):
    """Accept the lowest-entropy positions while sum(entropy) - max(entropy) <= bound (a bound on their joint
    mutual information). Returns a boolean mask in canvas order."""
    sorted_entropy, order = ops.sort(entropy)
    selected = (ops.cumsum(sorted_entropy) - sorted_entropy) <= bound
    return ops.scatter(order, selected)


class StepResult:
    __slots__ = ("canvas", "argmax", "probs", "mean_entropy", "accepted", "entropy")

    def __init__(self, canvas, argmax, probs, mean_entropy, accepted, entropy=None):
        self.canvas = canvas              # next canvas: accepted samples, the rest re-noised
        self.argmax = argmax              # argmax canvas (what is committed when the canvas stops)
        self.probs = probs                # softmax of the processed logits: next step's self-conditioning
        self.mean_entropy = mean_entropy  # [B]
        self.accepted = accepted          # [B, C] bool
        self.entropy = entropy            # [B, C] per-position entropy of the processed logits


def denoise_step(ops: ArrayOps, logits, canvas, *, steps_remaining: int, max_steps: int, t_min: float,
                 t_max: float, entropy_bound: float, uniforms, renoise_tokens,
                 owns_logits: bool = False) -> StepResult:
    """One sampler step on the decoder's logits [B, C, V]; `uniforms` [B, C] drive the categorical draw and
    `renoise_tokens` [B, C] replace every position not accepted. With `owns_logits` the backend may overwrite
    `logits` (the engine passes the decoder's fresh output, which nothing else reads). A backend whose ops offer
    `fused_step` (see ArrayOps) runs that instead of the op-by-op version."""
    t = temperature(steps_remaining, max_steps, t_min, t_max)
    fused = ops.fused_step
    if fused is not None:
        return StepResult(*fused(logits, canvas, t, entropy_bound, uniforms, renoise_tokens))
    return StepResult(*step_with_temperature(ops, logits, canvas, t, entropy_bound, uniforms, renoise_tokens,
                                             owns_logits))


def step_with_temperature(ops: ArrayOps, logits, canvas, t, entropy_bound, uniforms, renoise_tokens,
                          owns_logits: bool = False) -> tuple:
    """The step's array program, for a given temperature (a float, or a 0-d array when traced by a compiler)."""
    if owns_logits:
        processed, log_probs, probs = ops.tempered_log_softmax(logits, t)
    else:
        processed = logits / t
        log_probs = ops.log_softmax(processed)
        probs = ops.softmax(log_probs)
    entropy = entropy_from_log_probs(ops, log_probs, probs)
    argmax = ops.argmax(processed)
    sampled = ops.sample_categorical(probs, uniforms)
    accepted = entropy_bound_accept(ops, entropy, entropy_bound)
    next_canvas = ops.where(accepted, sampled, renoise_tokens)
    return next_canvas, argmax, probs, ops.mean(entropy), accepted, entropy


class StableAndConfident:
    """Stop a row when its argmax canvas equals that of each of the previous `stability_threshold` steps and the mean
    entropy of its processed logits is below `confidence_threshold`."""

    def __init__(self, ops: ArrayOps, stability_threshold: int, confidence_threshold: float):
        self.ops = ops
        self.window = stability_threshold
        self.threshold = confidence_threshold
        self.history: list = []  # the last `window` argmax canvases; missing entries never match (the reference's -1)

    def __call__(self, argmax, mean_entropy):
        ops = self.ops
        confident = mean_entropy < self.threshold
        if self.window == 0:
            return confident
        if len(self.history) < self.window:
            # Fewer past canvases than the window: not stable yet (the reference's history starts filled with -1).
            done = ops.full(tuple(mean_entropy.shape), False, like=mean_entropy)
        else:
            stable = ops.all_equal(self.history[0], argmax)
            for past in self.history[1:]:
                stable = ops.logical_and(stable, ops.all_equal(past, argmax))
            done = ops.logical_and(stable, confident)
        self.history = (self.history + [argmax])[-self.window:]
        return done

    def take_rows(self, take) -> None:
        """Keep the history of some rows only (`take` maps an array to its kept rows): the batch was compacted."""
        self.history = [take(h) for h in self.history]


class ScriptedNoise:
    """Deterministic noise keyed by (seed, row, block, step): independent of batch composition and of the order in
    which draws happen, and identical on every backend. Tests inject it into both dgemma and the reference."""

    def __init__(self, seed: int, ops: ArrayOps | None = None):
        self.seed = int(seed)
        self.ops = ops

    def _rng(self, block: int, step: int, kind: int):
        return np.random.default_rng([self.seed, block, step, kind])

    def tokens_np(self, block: int, step: int, n: int, vocab_size: int) -> np.ndarray:
        return self._rng(block, step, 0).integers(0, vocab_size, size=n, dtype=np.int64)

    def uniforms_np(self, block: int, step: int, n: int) -> np.ndarray:
        return self._rng(block, step, 1).random(n, dtype=np.float32)

    def tokens(self, block: int, step: int, n: int, vocab_size: int):
        return self.ops.from_numpy(self.tokens_np(block, step, n, vocab_size))

    def uniforms(self, block: int, step: int, n: int):
        return self.ops.from_numpy(self.uniforms_np(block, step, n))
