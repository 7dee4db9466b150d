"""Fine-tuning DiffusionGemma in MLX: the block-diffusion objective, LoRA, resumable training, HF export.

The MLX twin of backends/cuda/train.py, with the same objective (DESIGN.md section 3, NeMo AutoModel's recipe): the
encoder runs causally over the prompt, with gradients, producing the KV cache the decoder reads, and its ordinary
next-token loss is added (times `encoder_loss_weight`); each example draws t ~ U(0, 1) and every target token is
replaced by a uniform random token with probability t; the decoder's cross-entropy over the whole canvas is the
diffusion loss (no 1/t weight). Self-conditioning is trained with probability `self_conditioning_p` per example: a
first decoder pass on those rows without it (no gradient), then the training pass fed its softmax (rows not chosen get
zeros, which is exactly "no self-conditioning": the self-conditioning MLP of a zero vector is zero).

The forward passes are the inference model's own `encode` / `decode` (backends/mlx/model.py), which are
differentiable; training only uses the encoder's `cache_length` / `return_hidden` options.

The randomness of a step (t, the self-conditioning coins, the corruption) is drawn on the host with numpy: it is a few
kilobytes per batch, it makes every step a pure function of (seed, step) on any device, and the rows that get a first
pass are known without a device sync. The draws are the core's (`dgemma.training.noise_rng` / `draw_noise`), which
the PyTorch recipe uses too, so one seed trains the same on either backend. Files are interchangeable with the
PyTorch recipe's: LoRA adapters use the same safetensors layout and PEFT names, and `export_hf` writes the same
Hugging Face checkpoint, so either backend loads what the other wrote. (The resumable train state is MLX's own
file: optimizer states do not carry over.)

mx.compile is not used: on the CPU a step is bound by matmuls (mlx[cpu] on Linux links the reference BLAS; measured
on the default Sudoku model at batch 8, a compiled step took as long as an eager one, and its first call once took
over 100 s to trace), and a compiled step would bake the host-built attention masks into its trace. Metal is not
measured yet.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from dgemma.config import ModelConfig
from dgemma.training import (LORA_TARGETS, TrainConfig, TrainLoop, adapter_config, adapter_file,  # noqa: F401
                             check_adapter_names, draw_noise, noise_rng, objective_inputs, peft_key,
                             read_adapter_config, step_seed, write_adapter, write_checkpoint)
from dgemma.training import diffusion_objective as core_objective

from .model import DiffusionGemmaText, KVState, quantized_paths, sanitize, sanitize_name

# Buffers in the reference (and in the PyTorch model): stored in checkpoints, never trained.
FROZEN_BUFFERS = ("layer_scalar", "encoder_layer_scalar")


def _ids(x) -> mx.array:
    """Token ids (numpy, mx or anything array-like) as an int32 mx.array."""
    return x.astype(mx.int32) if isinstance(x, mx.array) else mx.array(np.asarray(x).astype(np.int32))


def _host(x) -> np.ndarray:
    return np.array(x) if isinstance(x, mx.array) else np.asarray(x)


# ----------------------------------------------------------------------------------------------------------------
# Differentiable forward passes (the inference model's own)
# ----------------------------------------------------------------------------------------------------------------


def logits_train(model: DiffusionGemmaText, h: mx.array) -> mx.array:
    """Float32 soft-capped logits of final-normed hidden states."""
    return model.logits(h)


def encode_train(model: DiffusionGemmaText, ids, valid: np.ndarray | None = None,
                 cache_length: int | None = None) -> tuple[KVState, mx.array]:
    """`model.encode` also running the last layer: (the KV cache of the first `cache_length` positions (default
    all), the final-normed hidden states [B, T, H] for next-token logits). Causal attention means the cache of a
    prefix does not depend on what follows it, so the encoder may see prompt + target while the decoder reads only
    the prompt's cache. `valid` is a host bool array [B, T] (default all True)."""
    ids = _ids(ids)
    valid = np.ones(ids.shape, dtype=bool) if valid is None else _host(valid).astype(bool)
    return model.encode(ids, valid, None, cache_length=cache_length, return_hidden=True)


def decode_train(model: DiffusionGemmaText, canvas, state: KVState, sc_probs: mx.array | None = None) -> mx.array:
    """`model.decode`: float32 soft-capped logits [B, C, V]."""
    return model.decode(_ids(canvas), state, sc_probs)


# ----------------------------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------------------------


def _select_rows(state: KVState, rows: np.ndarray) -> KVState:
    """The cache of some batch rows (gradient cut: it feeds only the no-gradient first pass)."""
    idx = mx.array(rows.astype(np.int32))
    return KVState([mx.stop_gradient(k[idx]) for k in state.keys], [mx.stop_gradient(v[idx]) for v in state.values],
                   state.valid[rows], state.length, state.has_padding)


def diffusion_objective(model: DiffusionGemmaText, prompts, targets, noisy, sc_mask, cfg: TrainConfig,
                        prompt_valid: np.ndarray | None = None) -> tuple[mx.array, dict]:
    """The loss for given noise, as mx arrays (differentiable: `nn.value_and_grad` runs this): (total loss,
    {"decoder", "encoder", "canvas_acc"}). prompts [B, P], targets and noisy [B, C], sc_mask [B] host bools. The
    steps are the core's `dgemma.training.diffusion_objective` over `MLXPasses`."""
    inputs = objective_inputs(_host(prompts), _host(targets), _host(sc_mask), cfg,
                              None if prompt_valid is None else _host(prompt_valid))
    return core_objective(MLXPasses(model), inputs, _ids(noisy), _ids(targets), cfg)


class MLXPasses:
    """The MLX forward passes that `dgemma.training.diffusion_objective` runs (host arrays in, mx arrays out)."""

    def __init__(self, model: DiffusionGemmaText):
        self.model = model

    def encode(self, ids, valid, cache_length: int):
        return encode_train(self.model, ids, valid, cache_length=cache_length)

    def next_token_loss(self, hidden, ids, weight) -> mx.array:
        ce = nn.losses.cross_entropy(logits_train(self.model, hidden[:, :-1]), _ids(ids)[:, 1:])
        return (ce * mx.array(weight)).sum()

    def first_pass(self, noisy, state, rows, index) -> mx.array:
        first = decode_train(self.model, noisy[mx.array(rows.astype(np.int32))], _select_rows(state, rows))
        probs = mx.stop_gradient(mx.softmax(first, axis=-1, precise=True))
        probs = mx.concatenate([probs, mx.zeros((1,) + probs.shape[1:], dtype=probs.dtype)], axis=0)
        return probs[mx.array(index)]

    def decode(self, noisy, state, sc_probs) -> mx.array:
        return decode_train(self.model, noisy, state, sc_probs)

    def canvas_loss(self, logits, targets):
        loss = nn.losses.cross_entropy(logits, targets).mean()
        return loss, mx.stop_gradient((mx.argmax(logits, axis=-1) == targets).astype(mx.float32).mean())


def diffusion_loss(model: DiffusionGemmaText, prompts, targets, cfg: TrainConfig,
                   rng: np.random.Generator | None = None, prompt_valid: np.ndarray | None = None,
                   t=None, sc_mask=None, noisy=None) -> tuple[mx.array, dict]:
    """Total loss (an evaluated mx scalar) and its parts as floats for one batch: prompts [B, P], targets [B, C]
    (C = canvas length). `t`, `sc_mask` (which rows get self-conditioning) and the corruption are drawn from the
    numpy Generator `rng` unless given; a given `noisy` canvas replaces the corruption (the parts' "noise" is then
    the fraction of positions that differ from the target)."""
    V = model.cfg.vocab_size
    t, sc_mask, drawn, replaced = draw_noise(targets, cfg, V, rng, t, sc_mask)
    if noisy is not None:
        noisy = _host(noisy)
        replaced = noisy != _host(targets)
    else:
        noisy = drawn
    loss, terms = diffusion_objective(model, prompts, targets, noisy, sc_mask, cfg, prompt_valid)
    mx.eval(loss, terms)
    return loss, {"loss": float(loss), **{k: float(v) for k, v in terms.items()},
                  "noise": float(replaced.mean())}


# ----------------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """y = base(x) + (x A^T B^T) * alpha / rank; A ~ kaiming-uniform (U(-1/sqrt(in), 1/sqrt(in)), as PyTorch's
    `kaiming_uniform_(a=sqrt(5))`), B = 0 (the wrapped layer's output at init). The base layer stays frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, key: mx.array | None = None):
        super().__init__()
        out_dims, in_dims = base.weight.shape
        self.base = base
        self.base.freeze()
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        dtype = base.weight.dtype
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_A = mx.random.uniform(-bound, bound, (self.rank, in_dims), key=key).astype(dtype)
        self.lora_B = mx.zeros((out_dims, self.rank), dtype=dtype)

    def merged_weight(self) -> mx.array:
        """W + B A alpha/r, summed in float64 and rounded once to W's dtype (what merge and export store, as the
        PyTorch recipe computes it)."""
        w = np.array(self.base.weight.astype(mx.float32), dtype=np.float64)
        a = np.array(self.lora_A.astype(mx.float32), dtype=np.float64)
        b = np.array(self.lora_B.astype(mx.float32), dtype=np.float64)
        merged = mx.array(w + (b @ a) * self.scaling, dtype=mx.float64)
        return merged.astype(self.base.weight.dtype, stream=mx.cpu)  # float64 exists on the CPU only

    def __call__(self, x):
        return self.base(x) + ((x @ self.lora_A.T) @ self.lora_B.T) * self.scaling


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _children_named(model: nn.Module, cls) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(path, parent, attribute, child) for every direct attribute of a module that is a `cls`."""
    out = []
    for path, parent in model.named_modules():
        for name, child in parent.items():
            if isinstance(child, cls):
                out.append((f"{path}.{name}" if path else name, parent, name, child))
    return out


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=LORA_TARGETS, seed: int | None = None) -> list[str]:
    """Wrap every nn.Linear whose attribute name is in `targets` (self-conditioning MLP included; the packed experts
    and the router are not nn.Linear and stay frozen); freeze everything else. `seed` fixes A's initialisation
    (without it MLX's global generator draws it). Returns the wrapped module names."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    model.freeze()
    found = [c for c in _children_named(model, nn.Linear) if c[2] in targets]
    if not found:
        raise ValueError(f"no nn.Linear named {sorted(targets)} in the model")
    keys = mx.random.split(mx.random.key(seed), len(found)) if seed is not None else [None] * len(found)
    for (path, parent, name, child), key in zip(found, keys):
        parent[name] = LoRALinear(child, rank, alpha, key)
    return [path for path, *_ in found]


def save_lora(model: nn.Module, path: str | os.PathLike) -> Path:
    """The adapters only, with PEFT's names (`base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight`).
    `path` ending in .safetensors: that one file (rank/alpha/targets in its metadata); otherwise a folder with
    adapter_model.safetensors + adapter_config.json (PEFT's layout). The PyTorch recipe's `load_lora` reads both."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters")
    any_mod = next(iter(mods.values()))
    from dgemma.adapters import peft_tensors  # each layer's adapters under the reference's encoder name too

    tensors = peft_tensors({name: (m.lora_A, m.lora_B) for name, m in mods.items()})
    return write_adapter(path, adapter_config(any_mod.rank, any_mod.alpha, mods),
                         lambda file, metadata: mx.save_safetensors(file, tensors, metadata=metadata))


def load_lora(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapters written by `save_lora` of either backend (wrapping the model first if it has none); every
    adapter must match in name and shape. The file's lora_alpha sets the scaling."""
    file = adapter_file(path)
    tensors, metadata = mx.load(str(file), format="safetensors", return_metadata=True)
    meta = read_adapter_config(path, metadata)
    mods = lora_modules(model)
    if not mods:
        apply_lora(model, int(meta["r"]), float(meta["lora_alpha"]), tuple(meta["target_modules"]))
        mods = lora_modules(model)
    check_adapter_names(file, tensors, {peft_key(n, w) for n in mods for w in "AB"})
    for name, m in mods.items():
        a, b = tensors[peft_key(name, "A")], tensors[peft_key(name, "B")]
        if a.shape != m.lora_A.shape or b.shape != m.lora_B.shape:
            raise ValueError(f"{file}: adapters do not match the model ({name}: A {a.shape}, B {b.shape}; the "
                             f"model has {m.lora_A.shape}, {m.lora_B.shape})")
        m.lora_A, m.lora_B = a.astype(m.lora_A.dtype), b.astype(m.lora_B.dtype)
        if "lora_alpha" in meta:
            m.alpha = float(meta["lora_alpha"])
            m.scaling = m.alpha / m.rank
    mx.eval(model.parameters())
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += B A alpha/r) and unwrap it, in place."""
    for _, parent, name, m in _children_named(model, LoRALinear):
        m.base.weight = m.merged_weight()
        parent[name] = m.base
    return model


# ----------------------------------------------------------------------------------------------------------------
# Building, loading and exporting models
# ----------------------------------------------------------------------------------------------------------------


def load_hf_tensors(model: DiffusionGemmaText, tensors: dict) -> None:
    """Load Hugging Face-named tensors (numpy or mx) into the model (names through `sanitize`), cast to the model's
    dtypes. Every parameter must be given, except the encoder's layer scalars (they default to the decoder's)."""
    weights = sanitize({k: (v if isinstance(v, mx.array) else mx.array(np.asarray(v))) for k, v in tensors.items()
                        if sanitize_name(k) is not None})
    if any(k.endswith(".scales") for k in weights):
        raise ValueError("quantized weights cannot be trained: convert the checkpoint to float first "
                         "(dgemma convert SRC DST --to hf)")
    own = dict(tree_flatten(model.parameters()))
    for i in range(len(model.layers)):
        weights.setdefault(f"layers.{i}.encoder_layer_scalar", weights.get(f"layers.{i}.layer_scalar"))
    missing = sorted(n for n in own if weights.get(n) is None)
    if missing:
        raise ValueError(f"missing tensor(s) {', '.join(missing[:3])}" + (f" and {len(missing) - 3} more"
                                                                        if len(missing) > 3 else ""))
    model.load_weights([(n, weights[n].astype(own[n].dtype)) for n in own], strict=True)
    mx.eval(model.parameters())


def new_model(config: dict, seed: int = 0) -> DiffusionGemmaText:
    """A fresh model with `dgemma.random_model`'s initialisation for the config.json dict `config`, float32 (the same
    weights as the PyTorch recipe's `new_model(config, seed)`)."""
    from dgemma.random_model import random_weights

    model = DiffusionGemmaText(ModelConfig.from_dict(config))
    load_hf_tensors(model, random_weights(config["text_config"], seed))
    return model


def load_model(folder: str | os.PathLike) -> tuple[DiffusionGemmaText, dict]:
    """A trainable float32 model from a checkpoint folder (single-file or sharded safetensors), and its config."""
    from dgemma.checkpoint import Checkpoint

    ckpt = Checkpoint(folder)
    model = DiffusionGemmaText(ckpt.config)
    tensors = {}
    for f in ckpt.files:
        tensors.update({k: v for k, v in mx.load(str(f), format="safetensors").items()
                        if sanitize_name(k) is not None})
    load_hf_tensors(model, tensors)
    return model, ckpt.raw_config


def hf_state_dict(model: DiffusionGemmaText) -> dict[str, np.ndarray]:
    """The model's weights under the names save_pretrained writes, float32 numpy (LoRA adapters merged in, the model
    untouched)."""
    quantized = quantized_paths(model)
    if quantized:
        raise ValueError(f"{next(iter(quantized))} is quantized: export writes float checkpoints of float models")
    mods = lora_modules(model)
    out = {}
    for name, value in tree_flatten(model.parameters()):
        if ".lora_" in name:
            continue
        if ".base." in name:
            value = mods[name.rsplit(".base.", 1)[0]].merged_weight()
            name = name.replace(".base.", ".")
        m = re.fullmatch(r"layers\.(\d+)\.encoder_layer_scalar", name)
        if m:
            key = f"model.encoder.language_model.layers.{m.group(1)}.layer_scalar"
        else:  # HF stores the packed experts as bare parameters
            key = "model.decoder." + re.sub(r"(\.experts\.(?:gate_up_proj|down_proj))\.weight$", r"\1", name)
        out[key] = np.array(value.astype(mx.float32))
    return out


def export_hf(model: DiffusionGemmaText, folder: str | os.PathLike, config: dict, generation_config: dict | None = None,
              write_tokenizer=None) -> Path:
    """Write a checkpoint folder `dgemma.load(folder)` reads on either backend: config.json, generation_config.json,
    model.safetensors (float32, adapters merged; the same names and layout as the PyTorch recipe's export), and the
    tokenizer files through `write_tokenizer(folder)`."""
    return write_checkpoint(folder, config, generation_config, hf_state_dict(model), write_tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------------


class Trainer(TrainLoop):
    """AdamW (PyTorch's: bias-corrected, decoupled weight decay) on the trainable parameters (all of them but the
    layer scalars, or the LoRA adapters). Every step's batch and noise are a function of (seed, step), so a resumed
    run takes exactly the steps an uninterrupted one would."""

    def __init__(self, model: DiffusionGemmaText, cfg: TrainConfig, model_config: dict | None = None):
        self.cfg = cfg
        if cfg.device is not None:
            from .backend import pick_device

            mx.set_default_device(pick_device(cfg.device))
        self.model = model
        self.model_config = model_config
        if cfg.lora_rank > 0 and not lora_modules(model):
            apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed=cfg.seed)
        elif cfg.lora_rank == 0:
            model.unfreeze()
            model.freeze(keys=list(FROZEN_BUFFERS))
        self.opt = optim.AdamW(learning_rate=cfg.lr, weight_decay=cfg.weight_decay, bias_correction=True)
        self.opt.init(model.trainable_parameters())
        self._loss_and_grad = nn.value_and_grad(model, self._objective)
        self.step = 0
        self.history: list[dict] = []

    @property
    def num_trainable(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))

    def _objective(self, prompts, targets, noisy, sc_mask, prompt_valid=None):
        return diffusion_objective(self.model, prompts, targets, noisy, sc_mask, self.cfg, prompt_valid)

    def train_step(self, prompts, targets, rng: np.random.Generator | None = None, prompt_valid=None) -> dict:
        """One AdamW step on a batch (arrays [B, P] / [B, C]; `prompt_valid` [B, P] marks left padding); returns
        the loss parts. The noise comes from `rng`, by default the core's generator of (cfg.seed, step)
        (`dgemma.training.noise_rng`, as the PyTorch recipe draws it)."""
        rng = noise_rng(self.cfg.seed, self.step) if rng is None else rng
        _, sc_mask, noisy, replaced = draw_noise(targets, self.cfg, self.model.cfg.vocab_size, rng)
        (loss, terms), grads = self._loss_and_grad(prompts, targets, noisy, sc_mask, prompt_valid)
        parts = {}
        if self.cfg.grad_clip:
            grads, norm = optim.clip_grad_norm(grads, self.cfg.grad_clip)
            parts["grad_norm"] = norm
        self.opt.learning_rate = self.lr_at(self.step)
        self.opt.update(self.model, grads)
        mx.eval(self.model.parameters(), self.opt.state, loss, terms, parts)
        parts = {"loss": float(loss), **{k: float(v) for k, v in terms.items()}, "noise": float(replaced.mean()),
                 **{k: float(v) for k, v in parts.items()}}
        self.step += 1
        parts["step"] = self.step
        parts["lr"] = self.lr_at(self.step - 1)
        self.history.append(parts)
        return parts

    def eval_loss(self, prompts, targets, seed: int = 1234, prompt_valid=None) -> float:
        """The objective on a batch with fixed noise (t, replacements, self-conditioning coins from `seed`);
        `prompt_valid` [B, P] marks left padding."""
        loss, _ = diffusion_loss(self.model, prompts, targets, self.cfg, np.random.default_rng(seed), prompt_valid)
        return float(loss)

    def one_step_accuracy(self, prompts, targets, cells: int = 81, blanks=None, seed: int = 4321) -> dict:
        """Denoise a fully random canvas once (t = 1, no self-conditioning) and score its argmax: accuracy over the
        first `cells` positions, over `blanks` [B, cells] positions only when given, and whole-answer exact match."""
        targets = _host(targets)
        noisy = np.random.default_rng(seed).integers(0, self.model.cfg.vocab_size, targets.shape)
        state, _ = encode_train(self.model, prompts)
        pred = np.array(mx.argmax(decode_train(self.model, noisy, state, None), axis=-1))
        ok = (pred == targets)[:, :cells]
        out = {"cell_acc": float(ok.mean()), "exact": float(ok.all(-1).mean())}
        if blanks is not None:
            b = _host(blanks).astype(bool)
            out["blank_acc"] = float((ok & b).sum() / max(b.sum(), 1))
        return out

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Model (adapters included), optimizer state and step in one safetensors file, written atomically (a temp
        file in the same folder, then os.replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"model." + k: v for k, v in tree_flatten(self.model.parameters())}
        arrays.update({"optimizer." + k: v for k, v in tree_flatten(self.opt.state)})
        meta = {"step": str(self.step), "train_config": json.dumps(asdict(self.cfg)),
                "model_config": json.dumps(self.model_config), "history": json.dumps(self.history)}
        # mx.save_safetensors appends ".safetensors" to a name without it: the temp name already ends so.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            mx.save_safetensors(tmp, arrays, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def load(self, path: str | os.PathLike) -> int:
        arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
        saved = json.loads(meta.get("train_config", "{}"))
        if int(saved.get("lora_rank", self.cfg.lora_rank)) != self.cfg.lora_rank:
            raise ValueError(f"{path}: saved with lora_rank={saved.get('lora_rank')}, this run has "
                             f"lora_rank={self.cfg.lora_rank}; resume with the same setting")
        self.model.load_weights([(k[len("model."):], v) for k, v in arrays.items() if k.startswith("model.")],
                                strict=True)
        self.opt.state = tree_unflatten([(k[len("optimizer."):], v) for k, v in arrays.items()
                                         if k.startswith("optimizer.")])
        self.opt.init(self.model.trainable_parameters())  # marks it initialised; keeps every loaded moment
        mx.eval(self.model.parameters(), self.opt.state)
        self.step = int(meta["step"])
        self.history = list(json.loads(meta.get("history", "[]")))
        return self.step
