"""The MLX backend (`--backend mlx`): Apple Silicon GPUs through Metal, and the CPU (mlx[cpu] on Linux, where the
tests run).

Everything stays lazy: `denoise` returns an unevaluated graph, the sampler's primitives extend it, and the scheduler's
one host read per step (`ops.to_numpy` of the per-row "done" flags) is the step's only `mx.eval`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm.auto import tqdm

from dgemma.backend import ArrayOps, Backend
from dgemma.checkpoint import Checkpoint
from dgemma.errors import BackendUnavailable, CheckpointError, InputError
from dgemma.weights import check_weights

from .cache import MLXBatchCache
from .model import DiffusionGemmaText, infer_quant_params, normalize_quant_block, sanitize, sanitize_name

DTYPES = {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
          "float16": mx.float16, "fp16": mx.float16}


@mx.compile
def _sample_categorical(probs, uniforms):
    cdf = mx.cumsum(probs, axis=-1)
    target = (uniforms * cdf[..., -1]).astype(cdf.dtype)
    # searchsorted(cdf, target, side="left") == how many cdf entries lie strictly below the target
    idx = mx.sum(cdf < target[..., None], axis=-1)
    return mx.minimum(idx, probs.shape[-1] - 1).astype(mx.int32)


@mx.compile  # traced per shape (the sampler's [B, C, V] is fixed for a run): a shapeless trace could reuse a reduction
def _log_softmax(x):
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def _compile_step(ops):
    """The whole sampler step as one compiled graph. Temperature and bound enter as arrays so that the trace is
    reused for every step and canvas (a Python float would be baked in and recompiled at every new value)."""
    from dgemma.sampler import step_with_temperature

    def step(logits, canvas, t, bound, uniforms, renoise):
        return step_with_temperature(ops, logits, canvas, t, bound, uniforms, renoise)

    compiled = mx.compile(step)

    def run(logits, canvas, t, bound, uniforms, renoise, reuse: bool = False):  # lazy arrays: nothing to reuse
        return compiled(logits, canvas, mx.array(t, dtype=mx.float32), mx.array(bound, dtype=mx.float32),
                        uniforms, renoise)

    return run


class MLXOps(ArrayOps):
    """The sampler's array primitives on mx.arrays (reductions over the last axis), all lazy.

    Token ids handed to the backend as mx.arrays cannot be range-checked without an extra evaluation, so the backend
    clamps them for the gather (an out-of-range id must never reach the embedding kernel) and queues a lazy check here;
    the next `to_numpy` (the step's one host read) evaluates it together with its argument and raises InputError."""

    def __init__(self):
        self._pending: list = []
        self.fused_step = _compile_step(self)

    def defer_check(self, ok, message: str) -> None:
        self._pending.append((ok, message))

    def from_numpy(self, x):
        return mx.array(np.asarray(x))

    def to_numpy(self, x):
        pending, self._pending = self._pending, []
        if pending:
            mx.eval(x, *[ok for ok, _ in pending])
            for ok, message in pending:
                if not ok.item():
                    raise InputError(message)
        return np.array(x)

    def log_softmax(self, x):
        return _log_softmax(x)

    def softmax(self, x):
        return mx.softmax(x, axis=-1, precise=True)

    def exp(self, x):
        return mx.exp(x)

    def sum(self, x):
        return mx.sum(x, axis=-1)

    def mean(self, x):
        return mx.mean(x, axis=-1)

    def argmax(self, x):
        return mx.argmax(x, axis=-1).astype(mx.int32)

    def sort(self, x):
        order = mx.argsort(x, axis=-1)
        return mx.take_along_axis(x, order, axis=-1), order

    def cumsum(self, x):
        return mx.cumsum(x, axis=-1)

    def scatter(self, index, src):
        return mx.put_along_axis(mx.zeros_like(src), index, src, axis=-1)

    def where(self, cond, a, b):
        return mx.where(cond, a, b)

    def clamp_min(self, x, value):
        return mx.maximum(x, value)

    def all_equal(self, a, b):
        return mx.all(a == b, axis=-1)

    def logical_and(self, a, b):
        return mx.logical_and(a, b)

    def full(self, shape, value, like):
        dtype = mx.bool_ if isinstance(value, (bool, np.bool_)) else like.dtype
        return mx.full(shape, value, dtype=dtype)

    def stack_rows(self, rows):
        return mx.stack(rows)

    def top_k(self, x, k):
        k = min(k, x.shape[-1])
        return mx.argsort(-x, axis=-1)[..., :k]

    def mask_position(self, logits, row, pos, allowed):
        keep = mx.array(np.asarray(allowed, dtype=bool))
        logits[row, pos] = mx.where(keep, logits[row, pos], -mx.inf)
        return logits

    def settle(self, *arrays) -> None:
        mx.eval(*arrays)

    def take_along(self, x, idx):
        i = mx.array(np.asarray(idx, dtype=np.int32))
        return mx.take_along_axis(x, i[..., None] if x.ndim == 3 else i, axis=1)

    def put_along(self, x, idx, values):
        i = mx.array(np.asarray(idx, dtype=np.int32))
        return mx.put_along_axis(x, i[..., None] if x.ndim == 3 else i, values.astype(x.dtype), axis=1)

    def take_rows(self, x, rows):
        return x[mx.array(np.asarray(rows, dtype=np.int32))]

    def sample_categorical(self, probs, uniforms):
        return _sample_categorical(probs, uniforms)


class MLXRowNoise:
    """One request's randomness: its own mx.random key, split at every draw, so a row draws the same numbers alone
    or in any batch (nothing is shared with the global MLX generator)."""

    def __init__(self, seed: int):
        self.key = mx.random.key(int(seed) & 0xFFFFFFFFFFFFFFFF)

    def _next(self):
        self.key, sub = mx.random.split(self.key)
        return sub

    def tokens(self, block, step, n, vocab_size):
        return mx.random.randint(0, vocab_size, (n,), dtype=mx.int32, key=self._next())

    def uniforms(self, block, step, n):
        return mx.random.uniform(shape=(n,), dtype=mx.float32, key=self._next())


def pick_device(device: str | None):
    if device in (None, "auto"):
        return mx.default_device()
    name = str(device).lower()
    if name == "cpu":
        return mx.cpu
    if name in ("gpu", "metal", "mps"):
        if not mx.is_available(mx.gpu):
            raise BackendUnavailable(f"--device {device}: this MLX build has no GPU (on Linux mlx[cpu] is CPU only)")
        return mx.gpu
    raise BackendUnavailable(f"--device {device!r} is not an MLX device (try cpu or gpu)")


class MLXBackend(Backend):
    name = "mlx"

    def __init__(self, checkpoint: Checkpoint, dtype: str | None = None, device: str | None = None,
                 progress: bool = False):
        self.checkpoint = checkpoint
        self.config = cfg = checkpoint.config
        self.device = pick_device(device)
        if device not in (None, "auto"):
            mx.set_default_device(self.device)
        name = dtype or cfg.dtype
        if name not in DTYPES:
            raise InputError(f"--dtype {name!r} is not supported; choose float32, bfloat16 or float16")
        self.dtype = DTYPES[name]
        self.model = DiffusionGemmaText(cfg)
        self._load_weights(self.model, progress)
        self.model.eval()
        self.ops = MLXOps()
        self.pass_width = max(self.config.canvas_length, self.prefill_chunk)
        if getattr(self.device, "type", self.device) != mx.DeviceType.cpu:  # a Device or a DeviceType
            self.pass_cost_tokens = float("inf")  # Metal streams all the weights per pass: one pass per batch

    # -- weights -------------------------------------------------------------------------------------------------------
    def _read(self, progress: bool) -> dict:
        raw = {}
        files = self.checkpoint.files
        for f in tqdm(files, desc="loading weights", unit="shard", disable=not progress, leave=False):
            try:
                shard = mx.load(str(f))
            except Exception as e:  # mlx raises ValueError/RuntimeError on a bad file
                raise CheckpointError(f"{f}: could not read tensor data ({e})") from None
            for k, v in shard.items():
                if sanitize_name(k) is not None:
                    raw[k] = v
        return sanitize(raw)

    def _load_weights(self, model: DiffusionGemmaText, progress: bool) -> None:
        ckpt = self.checkpoint
        if any(i.dtype.startswith("F8") or n.endswith("_packed") for n, i in ckpt.tensors.items()):
            raise CheckpointError(f"{ckpt.path}: an FP8/int4 checkpoint for the PyTorch backend (dgemma convert --to "
                                  "cuda or compressed-tensors); run it with --backend cuda, or convert it with "
                                  "`dgemma convert SRC DST --to mlx [--bits 4]`")
        weights = self._read(progress)
        if any(k.endswith(".scales") for k in weights):
            block = ckpt.raw_config.get("quantization") or ckpt.raw_config.get("quantization_config") or {}
            overrides = normalize_quant_block(block)
            default = {"mode": block.get("mode", "affine")}

            def predicate(path, m):
                if not hasattr(m, "to_quantized") or f"{path}.scales" not in weights:
                    return False
                if overrides.get(path) is False:
                    raise CheckpointError(f"{ckpt.path}: config.json marks {path} unquantized, but its weights are")
                over = overrides.get(path) if isinstance(overrides.get(path), dict) else {}
                try:  # the shapes decide group size and bits (as mlx-lm does); config only supplies the mode
                    return infer_quant_params(path, m, weights, {"mode": over.get("mode", default["mode"])})
                except ValueError as e:
                    raise CheckpointError(f"{ckpt.path}: {e}") from None

            nn.quantize(model, class_predicate=predicate)
        want = {n: tuple(v.shape) for n, v in tree_flatten(model.parameters())}
        check_weights(ckpt.path, {n: tuple(v.shape) for n, v in weights.items()}, want,
                      optional=lambda n: n.endswith("encoder_layer_scalar"), label=lambda n: f"{ckpt.path}: tensor {n}")
        for i in range(len(model.layers)):  # no separate encoder copy stored: share the decoder's value
            n = f"layers.{i}.encoder_layer_scalar"
            if n not in weights:
                weights[n] = weights[f"layers.{i}.layer_scalar"]
        cast = {n: (v if v.dtype in (mx.uint32, mx.uint8, mx.int32) else v.astype(self.dtype))
                for n, v in weights.items()}
        model.update(tree_unflatten(list(cast.items())))
        mx.eval(model.parameters())

    # -- the backend interface -----------------------------------------------------------------------------------------
    def _ids(self, x, what: str, *, defer: bool = False):
        V = self.config.vocab_size
        if isinstance(x, mx.array):
            if x.dtype in (mx.bool_, mx.float32, mx.float16, mx.bfloat16):
                raise InputError(f"{what} must be integer token ids")
            t = x if x.ndim != 1 else x[None]
            if t.ndim != 2:
                raise InputError(f"{what} must be [batch, length] token ids")
            ok = mx.logical_and(mx.min(t) >= 0, mx.max(t) < V) if t.size else mx.array(True)
            msg = f"{what} holds a token id outside the vocabulary [0, {V})"
            if not defer:
                if not ok.item():
                    raise InputError(msg)
                return t.astype(mx.int32)
            self.ops.defer_check(ok, msg)
            return mx.clip(t, 0, V - 1).astype(mx.int32)  # never hand the gather an out-of-range id
        a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
            raise InputError(f"{what} must be integer token ids")
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2:
            raise InputError(f"{what} must be [batch, length] token ids")
        if a.size and (int(a.min()) < 0 or int(a.max()) >= V):
            raise InputError(f"{what} holds a token id outside the vocabulary [0, {V})")
        return mx.array(a.astype(np.int32))

    def _valid(self, attention_mask, shape) -> np.ndarray:
        if attention_mask is None:
            return np.ones(shape, dtype=bool)
        m = attention_mask
        m = np.array(m) if isinstance(m, mx.array) else (m.detach().cpu().numpy() if hasattr(m, "detach")
                                                         else np.asarray(m))
        return m.astype(bool).reshape(shape)

    def new_cache(self) -> MLXBatchCache:
        return MLXBatchCache(self.config, self.model.dtype, self.pass_width)

    def prefill(self, token_ids, attention_mask=None, *, input_embeds=None, image_blocks=None) -> MLXBatchCache:
        ids = self._ids(token_ids, "token_ids")
        valid = self._valid(attention_mask, tuple(ids.shape))
        cache = self.new_cache()
        rows = cache.add_rows(ids.shape[0])
        for a, b in self.prefill_chunks(ids.shape[1], image_blocks):
            embeds = None if input_embeds is None else mx.array(np.asarray(input_embeds)[:, a:b])
            blocks = None if image_blocks is None else np.asarray(image_blocks)[:, a:b]
            self.model.extend(cache, rows, ids[:, a:b], valid[:, a:b], embeds, blocks)
        return cache

    def extend(self, cache: MLXBatchCache, token_ids, rows: slice | None = None, attention_mask=None, *,
               input_embeds=None, image_blocks=None) -> None:
        ids = self._ids(token_ids, "token_ids")
        rows = slice(0, cache.rows) if rows is None else rows
        embeds = None if input_embeds is None else mx.array(np.asarray(input_embeds))
        blocks = None if image_blocks is None else np.asarray(image_blocks)
        self.model.extend(cache, rows, ids, self._valid(attention_mask, tuple(ids.shape)), embeds, blocks)

    def denoise_hidden(self, cache: MLXBatchCache, canvas_ids, self_conditioning=None, *, rows: slice | None = None,
                       positions=None):
        canvas = self._ids(canvas_ids, "canvas_ids", defer=True)
        rows = slice(0, cache.rows) if rows is None else rows
        return self.model.decode_rows(cache, rows, canvas, self_conditioning, positions)

    def lm_logits(self, hidden):
        return self.model.logits(hidden)

    def soft_embedding(self, probs):
        return self.model.soft_embedding(probs)

    def denoise(self, state: MLXBatchCache, canvas_ids, self_conditioning_logits=None, *,
                self_conditioning_probs=None, self_conditioning=None, rows: slice | None = None):
        soft = self_conditioning
        if soft is None:
            probs = self_conditioning_probs
            if probs is None and self_conditioning_logits is not None:
                sc = self_conditioning_logits
                sc = sc if isinstance(sc, mx.array) else mx.array(np.asarray(sc))
                # The reference hands the decoder the logits cast to the embedding dtype, then softmaxes in float32.
                probs = mx.softmax(sc.astype(self.model.dtype).astype(mx.float32), axis=-1)
            soft = None if probs is None else self.model.soft_embedding(probs)
        return self.model.logits(self.denoise_hidden(state, canvas_ids, soft, rows=rows))

    def commit(self, state: MLXBatchCache, canvas_ids, rows: slice | None = None) -> None:
        self.extend(state, canvas_ids, rows)

    def image_embeddings(self, token_ids, images):
        from .vision import prompt_embeddings  # the vision tower is imported and loaded on first use

        return prompt_embeddings(self, token_ids, images)

    def row_noise(self, seed: int) -> MLXRowNoise:
        return MLXRowNoise(seed)

    def describe(self) -> str:
        dt = str(self.dtype).replace("mlx.core.", "")
        q = {m.bits for _, m in self.model.named_modules() if hasattr(m, "bits") and hasattr(m, "group_size")}
        quant = f", {'/'.join(str(b) for b in sorted(q))}-bit quantized" if q else ""
        return f"mlx backend (MLX {mx.__version__}, {self.device}, {dt}{quant})"
