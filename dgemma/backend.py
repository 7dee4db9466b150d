"""The small interface every backend implements, and the registry that finds backends by name.

A backend owns the weights and the device. The core drives it with three calls (prefill, denoise, commit) and runs
the sampler on the backend's own arrays through `ArrayOps`, so the (batch x canvas x vocab) logits never leave the
device during denoising: only a per-row "done" flag per step and the finished canvas per block come back to the host.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, Protocol

from .config import ModelConfig
from .errors import BackendUnavailable


class ArrayOps(Protocol):
    """Array primitives the core sampler needs. Arrays support + - * / and comparisons with scalars and arrays of the
    same backend; every reduction here is over the last axis."""

    def from_numpy(self, x) -> Any: ...
    def to_numpy(self, x) -> Any: ...
    def log_softmax(self, x) -> Any: ...                    # x - logsumexp(x)
    def softmax(self, x) -> Any: ...
    def sum(self, x) -> Any: ...
    def mean(self, x) -> Any: ...
    def argmax(self, x) -> Any: ...
    def sort(self, x) -> tuple[Any, Any]: ...               # ascending values and their indices
    def cumsum(self, x) -> Any: ...
    def scatter(self, index, src) -> Any: ...               # out[..., index[..., j]] = src[..., j]
    def where(self, cond, a, b) -> Any: ...
    def clamp_min(self, x, value: float) -> Any: ...
    def all_equal(self, a, b) -> Any: ...                   # per-row: all(a == b) over the last axis
    def logical_and(self, a, b) -> Any: ...
    def full(self, shape, value, like) -> Any: ...          # like: an array whose dtype/device to use
    def stack_rows(self, rows: list) -> Any: ...            # [B] list of [C] arrays -> [B, C]
    def sample_categorical(self, probs, uniforms) -> Any:   # inverse-CDF draw, one per row of probs
        ...
    # Optional: take_rows(x, rows) -> x[rows] along the first axis (rows: host int array). With it and
    # Backend.select_rows the scheduler drops stopped rows from the batch.


class RowNoise(Protocol):
    """Randomness of one request (a batch row): the canvas's random tokens and the uniforms that drive sampling.
    `block` counts canvases from 0; `step` is 0 for the initial canvas and n for the n-th denoising pass."""

    def tokens(self, block: int, step: int, n: int, vocab_size: int) -> Any: ...
    def uniforms(self, block: int, step: int, n: int) -> Any: ...


class Backend(ABC):
    """What a backend implements. `state` is whatever the backend keeps per batch (its KV cache)."""

    name: str = "?"
    config: ModelConfig
    ops: ArrayOps

    @abstractmethod
    def prefill(self, token_ids, attention_mask=None) -> Any:
        """Run the causal encoder over left-padded prompts [B, T] (mask: 1 = real token) and return the state."""

    @abstractmethod
    def denoise(self, state, canvas_ids, self_conditioning_logits=None, *, self_conditioning_probs=None) -> Any:
        """Bidirectional decoder over the canvas [B, C] reading the state; float32 logits [B, C, V] (soft-capped).
        `self_conditioning_probs` is the softmax of the previous step's processed logits, when the caller already
        has it (it saves one pass over B x C x V)."""

    @abstractmethod
    def commit(self, state, canvas_ids) -> None:
        """Run the encoder over a finished canvas [B, C], appending it to the state."""

    @abstractmethod
    def row_noise(self, seed: int) -> RowNoise:
        """The backend's own device RNG for one request."""

    def select_rows(self, state, rows) -> Any:  # pragma: no cover - optional
        """A copy of `state` holding only batch rows `rows` (host int array), for the denoising passes of the rows
        still running; the scheduler keeps committing to the full state."""
        raise NotImplementedError

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
