"""The PyTorch backend (`--backend cuda`): CUDA GPUs from RTX to Blackwell, and the CPU (where the tests run)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from dgemma.backend import ArrayOps, Backend
from dgemma.checkpoint import Checkpoint
from dgemma.errors import BackendUnavailable, CheckpointError, InputError
from dgemma.weights import check_weights

from .cache import TorchBatchCache
from .model import DiffusionGemmaText, expected_shapes, sanitize_name
from .quantized import install_quantized_modules, quantization_kind
from .sampling import ChunkedSampler, Workspace, inverse_cdf

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class TorchOps(ArrayOps):
    """The sampler's array primitives on torch tensors (reductions over the last dim)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.workspace = Workspace()  # the vocabulary-sized buffers kept between passes (logits, probs)
        self.fused_step = ChunkedSampler(self)

    def release_buffers(self) -> None:
        self.workspace.clear()

    def from_numpy(self, x):
        return torch.as_tensor(np.asarray(x)).to(self.device, non_blocking=True)

    def to_numpy(self, x):
        return x.detach().cpu().numpy()

    def log_softmax(self, x):
        # Written as torch.distributions.Categorical normalises, so entropies match the reference bit for bit.
        return x - x.logsumexp(dim=-1, keepdim=True)

    def softmax(self, x):
        return torch.softmax(x, dim=-1)

    def sum(self, x):
        return x.sum(-1)

    def mean(self, x):
        return x.mean(-1)

    def argmax(self, x):
        return x.argmax(-1)

    def sort(self, x):
        return torch.sort(x, dim=-1)

    def cumsum(self, x):
        return torch.cumsum(x, dim=-1)

    def scatter(self, index, src):
        return torch.zeros_like(src).scatter(-1, index, src)

    def where(self, cond, a, b):
        return torch.where(cond, a, b)

    def clamp_min(self, x, value):
        return torch.clamp(x, min=value)

    def tempered_log_softmax(self, logits, temperature: float):
        """(processed, log_probs, probs) for logits the caller hands over: the division happens in place, saving a
        B x C x V allocation; values are those of logits / t, x - logsumexp(x) and softmax of that."""
        with torch.inference_mode():  # the decoder's logits are inference tensors
            processed = logits.div_(temperature)
            log_probs = processed - processed.logsumexp(dim=-1, keepdim=True)
            return processed, log_probs, torch.softmax(log_probs, dim=-1)

    def entropy(self, log_probs, probs):
        # -(clamp(log p) * p).sum(), as torch.distributions.Categorical computes it, with one temporary.
        with torch.inference_mode():
            return torch.clamp(log_probs, min=torch.finfo(log_probs.dtype).min).mul_(probs).sum(-1).neg_()

    def all_equal(self, a, b):
        return (a == b).all(-1)

    def logical_and(self, a, b):
        return a & b

    def take_along(self, x, idx):
        i = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=x.device)
        if x.ndim == 3:
            i = i[..., None].expand(-1, -1, x.shape[2])
        return torch.gather(x, 1, i)

    def put_along(self, x, idx, values):
        i = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=x.device)
        if x.ndim == 3:
            i = i[..., None].expand(-1, -1, x.shape[2])
        return x.scatter(1, i, values.to(x.dtype))

    def take_rows(self, x, rows):
        return x.index_select(0, torch.as_tensor(np.asarray(rows), dtype=torch.long, device=x.device))

    def top_k(self, x, k):
        return torch.topk(x, min(k, x.shape[-1]), dim=-1).indices

    def mask_position(self, logits, row, pos, allowed):
        keep = torch.as_tensor(np.asarray(allowed, dtype=bool), device=logits.device)
        with torch.inference_mode():
            logits[row, pos].masked_fill_(~keep, float("-inf"))
        return logits

    def full(self, shape, value, like):
        return torch.full(shape, value, device=like.device)

    def stack_rows(self, rows):
        return torch.stack(rows)

    def sample_categorical(self, probs, uniforms):
        return inverse_cdf(torch.cumsum(probs, dim=-1), uniforms)


class TorchRowNoise:
    """One request's randomness from a torch.Generator on the model's device (no host round-trip)."""

    def __init__(self, seed: int, device: torch.device):
        self.gen = torch.Generator(device=device).manual_seed(int(seed))
        self.device = device

    def tokens(self, block, step, n, vocab_size):
        return torch.randint(0, vocab_size, (n,), generator=self.gen, device=self.device)

    def uniforms(self, block, step, n):
        return torch.rand(n, generator=self.gen, device=self.device)


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BackendUnavailable(f"--device {device!r} is not a torch device (try cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"--device {device}: this PyTorch build has no CUDA GPU available")
    return dev


def _materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate (uninitialised) every parameter and buffer still on the meta device; leaves real tensors alone."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and t.is_meta:
                    new = torch.empty_like(t, device=device)
                    store[name] = torch.nn.Parameter(new, requires_grad=False) if isinstance(t, torch.nn.Parameter) else new


class TorchBackend(Backend):
    name = "cuda"

    def __init__(self, checkpoint: Checkpoint, dtype: str | None = None, device: str | None = None,
                 progress: bool = False):
        self.checkpoint = checkpoint
        self.config = cfg = checkpoint.config
        self.device = pick_device(device)
        name = dtype or cfg.dtype
        if name not in DTYPES:
            raise InputError(f"--dtype {name!r} is not supported; choose float32, bfloat16 or float16")
        self.dtype = DTYPES[name]
        raw = checkpoint.raw_config
        if raw.get("quantization") or any(n.endswith(".biases") for n in checkpoint.tensors):
            raise CheckpointError(f"{checkpoint.path}: an MLX-quantized checkpoint; run it with --backend mlx, or "
                                  "turn it back with `dgemma convert SRC DST --to hf`")
        with torch.device("meta"):
            model = DiffusionGemmaText(cfg).to(self.dtype)
        # FP8 / int4 checkpoints (dgemma convert --to cuda, compressed-tensors FP8): those modules are swapped for
        # quantized ones before anything is allocated, so the dense weights never exist in memory.
        self.quantized = set()
        if quantization_kind(checkpoint):
            self.quantized = install_quantized_modules(model, checkpoint, sanitize_name, self.device, self.dtype)
        _materialize(model, self.device)
        self._load_weights(model, progress)
        self.model = model.eval()
        self.ops = TorchOps(self.device)
        self.pass_width = max(self.config.canvas_length, self.prefill_chunk)
        if self.device.type != "cpu":
            self.pass_cost_tokens = float("inf")  # a GPU pass streams all the weights: fast mode keeps one per batch

    def _load_weights(self, model: DiffusionGemmaText, progress: bool) -> None:
        ckpt = self.checkpoint
        want = expected_shapes(self.config)
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        ours = {n: sanitize_name(n) for n in ckpt.tensors}
        names = {o: n for n, o in ours.items() if o in want and o not in self.quantized}
        have = {ours: ckpt.tensors[hf].shape for ours, hf in names.items()}
        have.update({n: want[n] for n in self.quantized})
        check_weights(ckpt.path, have, want, optional=lambda n: n.endswith("encoder_layer_scalar"), unknown_ok=True,
                      label=lambda n: f"{ckpt.tensors[names[n]].file}: tensor {names[n]}")
        it = ckpt.iter_tensors("pt", set(names.values()))
        bar = tqdm(it, total=len(names), desc="loading weights", unit="tensor", disable=not progress, leave=False)
        seen = set(self.quantized)
        with torch.no_grad():
            for hf_name, tensor in bar:
                if tensor.dtype.itemsize == 1 and tensor.is_floating_point():  # FP8 without a scale beside it
                    raise CheckpointError(f"{ckpt.tensors[hf_name].file}: {hf_name} is float8 but has no "
                                          f"{hf_name}_scale")
                target = params[sanitize_name(hf_name)]
                target.copy_(tensor.to(self.device, dtype=target.dtype))
                seen.add(sanitize_name(hf_name))
        for i, layer in enumerate(model.layers):  # no separate encoder copy stored: share the decoder's value
            if f"layers.{i}.encoder_layer_scalar" not in seen:
                layer.encoder_layer_scalar.copy_(layer.layer_scalar)
        for p in model.parameters():
            p.requires_grad_(False)
        model.reset_rope()  # computed, not loaded; float32 whatever the weights' dtype

    # -- the backend interface ---------------------------------------------------------------------------------
    def _ids(self, x, what: str) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        if t.dtype == torch.bool or t.is_floating_point():
            raise InputError(f"{what} must be integer token ids")
        if t.ndim == 1:
            t = t[None]
        if t.ndim != 2:
            raise InputError(f"{what} must be [batch, length] token ids")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.config.vocab_size):
            raise InputError(f"{what} holds a token id outside the vocabulary [0, {self.config.vocab_size})")
        return t.to(self.device, torch.long)

    def _valid(self, attention_mask, ids: torch.Tensor) -> np.ndarray:
        if attention_mask is None:
            return np.ones(tuple(ids.shape), dtype=bool)
        m = attention_mask.detach().cpu().numpy() if isinstance(attention_mask, torch.Tensor) else attention_mask
        return np.asarray(m).astype(bool).reshape(tuple(ids.shape))

    @torch.inference_mode()
    def new_cache(self) -> TorchBatchCache:
        return TorchBatchCache(self.config, self.device, self.dtype, self.pass_width)

    @torch.inference_mode()
    def prefill(self, token_ids, attention_mask=None, *, input_embeds=None, image_blocks=None) -> TorchBatchCache:
        ids = self._ids(token_ids, "token_ids")
        valid = self._valid(attention_mask, ids)
        cache = self.new_cache()
        rows = cache.add_rows(ids.shape[0])
        for a, b in self.prefill_chunks(ids.shape[1], image_blocks):
            embeds = None if input_embeds is None else torch.as_tensor(input_embeds)[:, a:b].to(self.device)
            blocks = None if image_blocks is None else np.asarray(image_blocks)[:, a:b]
            self.model.extend(cache, rows, ids[:, a:b], valid[:, a:b], embeds, blocks)
        return cache

    @torch.inference_mode()
    def extend(self, cache: TorchBatchCache, token_ids, rows: slice | None = None, attention_mask=None, *,
               input_embeds=None, image_blocks=None) -> None:
        ids = self._ids(token_ids, "token_ids")
        rows = slice(0, cache.rows) if rows is None else rows
        embeds = None if input_embeds is None else torch.as_tensor(np.asarray(input_embeds)).to(self.device)
        blocks = None if image_blocks is None else np.asarray(image_blocks)
        self.model.extend(cache, rows, ids, self._valid(attention_mask, ids), embeds, blocks)

    def _soft(self, self_conditioning, self_conditioning_logits, self_conditioning_probs):
        if self_conditioning is not None:
            return self_conditioning
        probs = self_conditioning_probs
        if probs is None and self_conditioning_logits is not None:
            sc = torch.as_tensor(self_conditioning_logits).to(self.device)
            # The reference hands the decoder the logits cast to the embedding dtype, then softmaxes in float32.
            probs = torch.softmax(sc.to(self.dtype), dim=-1, dtype=torch.float32)
        return None if probs is None else self.model.soft_embedding(probs)

    @torch.inference_mode()
    def denoise_hidden(self, cache: TorchBatchCache, canvas_ids, self_conditioning=None, *, rows: slice | None = None,
                       positions=None):
        canvas = self._ids(canvas_ids, "canvas_ids")
        rows = slice(0, cache.rows) if rows is None else rows
        return self.model.decode_rows(cache, rows, canvas, self_conditioning, positions)

    @torch.inference_mode()
    def lm_logits(self, hidden):
        # The engine consumes these logits within the pass, so they live in buffers reused by the next pass.
        return self.model.logits(hidden, workspace=self.ops.workspace)

    @torch.inference_mode()
    def soft_embedding(self, probs):
        return self.model.soft_embedding(probs)

    @torch.inference_mode()
    def denoise(self, state: TorchBatchCache, canvas_ids, self_conditioning_logits=None, *,
                self_conditioning_probs=None, self_conditioning=None, rows: slice | None = None):
        soft = self._soft(self_conditioning, self_conditioning_logits, self_conditioning_probs)
        return self.model.logits(self.denoise_hidden(state, canvas_ids, soft, rows=rows))

    @torch.inference_mode()
    def commit(self, state: TorchBatchCache, canvas_ids, rows: slice | None = None) -> None:
        self.extend(state, canvas_ids, rows)

    def image_embeddings(self, token_ids, images):
        from .vision import prompt_embeddings  # the vision tower is imported and loaded on first use

        return prompt_embeddings(self, token_ids, images)

    def row_noise(self, seed: int) -> TorchRowNoise:
        return TorchRowNoise(seed, self.device)

    def describe(self) -> str:
        return f"cuda backend (PyTorch {torch.__version__}, {self.device}, {str(self.dtype).replace('torch.', '')})"
