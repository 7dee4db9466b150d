"""The small interface every backend implements, and the registry that finds backends by name.

A backend owns the weights and the device. The core drives it with three calls (prefill, denoise, commit) and runs
the sampler on the backend's own arrays through `ArrayOps`, so the (batch x canvas x vocab) logits never leave the
device during denoising: only a per-row "done" flag per step and the finished canvas per block come back to the host.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, Protocol

import numpy as np

from .config import ModelConfig
from .errors import BackendUnavailable, InputError


FLOAT32_MIN = float(np.finfo(np.float32).min)


class ArrayOps:
    """Array primitives the core sampler and engine need, on a backend's own arrays. Arrays support + - * / and
    comparisons with scalars and arrays of the same backend; every reduction here is over the last axis.

    A backend implements the abstract ones; the others have a portable definition here that a backend may replace
    with a fused one (same values: the parity tests say so)."""

    def from_numpy(self, x) -> Any: raise NotImplementedError
    def to_numpy(self, x) -> Any: raise NotImplementedError
    def log_softmax(self, x) -> Any: raise NotImplementedError    # x - logsumexp(x)
    def softmax(self, x) -> Any: raise NotImplementedError
    def sum(self, x) -> Any: raise NotImplementedError
    def mean(self, x) -> Any: raise NotImplementedError
    def argmax(self, x) -> Any: raise NotImplementedError
    def sort(self, x) -> tuple[Any, Any]: raise NotImplementedError  # ascending values and their indices
    def cumsum(self, x) -> Any: raise NotImplementedError
    def scatter(self, index, src) -> Any: raise NotImplementedError  # out[..., index[..., j]] = src[..., j]
    def where(self, cond, a, b) -> Any: raise NotImplementedError
    def clamp_min(self, x, value: float) -> Any: raise NotImplementedError
    def all_equal(self, a, b) -> Any: raise NotImplementedError      # per row: all(a == b) over the last axis
    def logical_and(self, a, b) -> Any: raise NotImplementedError
    def full(self, shape, value, like) -> Any: raise NotImplementedError  # like: whose dtype/device to use
    def stack_rows(self, rows: list) -> Any: raise NotImplementedError    # list of [...] arrays -> [n, ...]
    def take_rows(self, x, rows) -> Any: raise NotImplementedError       # x[rows] along the first axis
    def sample_categorical(self, probs, uniforms) -> Any: raise NotImplementedError  # inverse-CDF, one per row
    def top_k(self, x, k: int) -> Any: raise NotImplementedError         # indices of the k largest, best first
    def mask_position(self, logits, row: int, pos: int, allowed) -> Any:  # logits[row, pos, ~allowed] = -inf
        raise NotImplementedError
    def take_along(self, x, idx) -> Any: raise NotImplementedError     # x[r, idx[r, j], ...] -> [k, A, ...]
    def put_along(self, x, idx, values) -> Any: raise NotImplementedError  # copy of x with x[r, idx[r, j]] = values

    # -- optional fast paths, with their portable definitions ----------------------------------------------------
    def settle(self, *arrays) -> None:
        """Compute these now (a lazy framework evaluates them, so a tile's temporaries are freed before the next
        tile's are made); eager frameworks have nothing to do."""
    # The whole sampler step in one call, where a backend has a faster form than the op-by-op program
    # (sampler.step_with_temperature): MLX one compiled graph, PyTorch the same program a cache-sized chunk of
    # positions at a time in kept buffers.
    # Called as fused_step(logits, canvas, t, bound, uniforms, renoise, reuse=bool); with reuse the returned probs may
    # live in a buffer the next call overwrites.
    fused_step = None

    def release_buffers(self) -> None:
        """Free the buffers a backend keeps from pass to pass (the engine calls this when it falls idle)."""

    def entropy(self, log_probs, probs):
        """Shannon entropy per position, as torch.distributions.Categorical computes it (clamped log-probs)."""
        return -self.sum(self.clamp_min(log_probs, FLOAT32_MIN) * probs)

    def tempered_log_softmax(self, logits, temperature):
        """(processed, log_probs, probs) of logits the caller hands over (a backend may overwrite them)."""
        processed = logits / temperature
        log_probs = self.log_softmax(processed)
        return processed, log_probs, self.softmax(log_probs)


class RowNoise(Protocol):
    """Randomness of one request (a batch row): the canvas's random tokens and the uniforms that drive sampling.
    `block` counts canvases from 0; `step` is 0 for the initial canvas and n for the n-th denoising pass."""

    def tokens(self, block: int, step: int, n: int, vocab_size: int) -> Any: ...
    def uniforms(self, block: int, step: int, n: int) -> Any: ...


class BatchCache(Protocol):
    """A backend's KV cache for a batch of rows (requests), preallocated and read in place. `layout`
    (dgemma.kvlayout.RowLayout) is its host-side bookkeeping: per-row lengths and pad masks."""

    layout: Any

    @property
    def rows(self) -> int: ...
    def add_rows(self, count: int) -> slice: ...                        # new empty rows at the end
    def take(self, order) -> None: ...                                  # keep rows `order`, in that order
    def copy_rows_from(self, other, src: slice, dst: slice) -> None: ...  # rows of another cache of this model
    def nbytes(self, rows: slice | None = None) -> int: ...


class Backend(ABC):
    """What a backend implements: weights on a device, a batch cache, the encoder and decoder passes over it, and
    `ops` for the sampler. Rows of a cache are addressed by slices (contiguous ranges): passes read them in place."""

    name: str = "?"
    config: ModelConfig
    ops: ArrayOps
    prefill_chunk: int = 256  # prompt tokens per encoder pass (the real canvas length): bounds a prefill's memory
    # A decoder pass's fixed cost, in forwarded positions: fast mode splits a batch into passes of its own for runs
    # of rows when that saves more positions than this per extra pass. Measured on this project's CPU with the
    # Sudoku model: ~9 ms a pass + 0.07 ms a position, about 130 positions. A GPU streams every weight in each pass
    # whatever it forwards, so a GPU backend sets it to infinity (one pass per batch).
    pass_cost_tokens: float = 128

    @abstractmethod
    def new_cache(self) -> BatchCache:
        """An empty batch cache."""

    @abstractmethod
    def prefill(self, token_ids, attention_mask=None, *, input_embeds=None, image_blocks=None) -> BatchCache:
        """Run the causal encoder over left-padded prompts [B, T] (mask: 1 = real token), `prefill_chunk` tokens per
        pass, into a new cache of B rows. `input_embeds` [B, T, hidden] replace the token embeddings (image
        features); `image_blocks` [B, T] (0 text, b > 0 image b) make each image's tokens attend both ways."""

    @abstractmethod
    def extend(self, cache, token_ids, rows: slice | None = None, attention_mask=None, *, input_embeds=None,
               image_blocks=None) -> None:
        """Append tokens [k, T] to rows `rows` through the encoder (a prompt's remainder after a cached prefix);
        `input_embeds` and `image_blocks` as in `prefill`."""

    @abstractmethod
    def denoise_hidden(self, cache, canvas_ids, self_conditioning=None, *, rows: slice | None = None,
                       positions=None) -> Any:
        """Bidirectional decoder over the canvases [k, C] of rows `rows`: the final-normed hidden states [k, C, H].
        `self_conditioning` is the previous pass's soft embedding [k, C, H] (None: no previous pass). With
        `positions` (host ints [k, A], fast mode) only those canvas positions are forwarded: canvas_ids and
        self_conditioning hold just them, their keys/values overwrite theirs in the cache's canvas slots, and the
        other canvas positions are attended through the keys/values an earlier pass left there."""

    @abstractmethod
    def lm_logits(self, hidden) -> Any:
        """Float32 soft-capped logits [..., V] of hidden states (the tied LM head)."""

    @abstractmethod
    def soft_embedding(self, probs) -> Any:
        """softmax(processed logits) [k, C, V] @ embedding * sqrt(hidden): the next pass's self-conditioning."""

    @abstractmethod
    def denoise(self, state, canvas_ids, self_conditioning_logits=None, *, self_conditioning_probs=None,
                self_conditioning=None, rows: slice | None = None) -> Any:
        """Decoder logits [k, C, V] (float32, soft-capped). Self-conditioning as the previous step's processed
        logits, their softmax, or the soft embedding (the cheapest, and what the engine keeps)."""

    @abstractmethod
    def commit(self, state, canvas_ids, rows: slice | None = None) -> None:
        """Run the encoder over finished canvases [k, C] of rows `rows`, appending them to the cache."""

    @abstractmethod
    def row_noise(self, seed: int) -> RowNoise:
        """The backend's own device RNG for one request."""

    def image_embeddings(self, token_ids, images) -> np.ndarray:
        """float32 [T, hidden] host array: one prompt's token embeddings with its images' soft tokens (the vision
        tower's output, dgemma.vision.PreprocessedImage in prompt order) in place of its image tokens."""
        raise InputError(f"the {self.name} backend does not take images")

    def select_rows(self, state, rows) -> BatchCache:
        """A new cache holding copies of rows `rows` (host ints)."""
        out = self.new_cache()
        for r in np.asarray(rows, dtype=np.int64):
            out.copy_rows_from(state, slice(int(r), int(r) + 1), out.add_rows(1))
        return out

    def prefill_chunks(self, length: int, image_blocks=None) -> list[tuple[int, int]]:
        """[start, end) of each encoder pass of a prefill: `prefill_chunk` tokens, never splitting an image (whose
        tokens must see each other in one pass); the same boundaries for any prompt, so that a cached prefix and a
        fresh prefill compute the same numbers."""
        bounds, a = [], 0
        blocks = None if image_blocks is None else np.asarray(image_blocks).reshape(-1, length)
        while a < length:
            b = min(a + self.prefill_chunk, length)
            while blocks is not None and b < length and ((blocks[:, b] > 0) & (blocks[:, b] == blocks[:, b - 1])).any():
                b += 1  # inside an image: run on to its end
            bounds.append((a, b))
            a = b
        return bounds

    def describe(self) -> str:
        return self.name


# name -> (module, class, how to install)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "cuda": ("dgemma.backends.cuda", "TorchBackend", 'pip install "dgemma[cuda]"  (PyTorch; runs on CPU too)'),
    "mlx": ("dgemma.backends.mlx", "MLXBackend",
            'pip install "dgemma[mlx]"  (on Linux: pip install "mlx[cpu]" mlx-lm)'),
}
_ALIASES = {"torch": "cuda", "pytorch": "cuda", "cpu": "cuda"}
BACKEND_NAMES = tuple(_REGISTRY)


def register_backend(name: str, module: str, cls: str, install_hint: str = "") -> None:
    """Add a backend; the module is imported only when the backend is first used."""
    _REGISTRY[name] = (module, cls, install_hint)


def backend_class(name: str):
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    module, cls, hint = _REGISTRY[key]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        raise BackendUnavailable(f"backend {key!r} needs {missing!r}, which is not installed: {hint}") from None
    return getattr(mod, cls)
