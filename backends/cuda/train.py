"""Fine-tuning DiffusionGemma in PyTorch: the block-diffusion objective, LoRA, resumable training, HF export.

The objective (DESIGN.md section 3, NeMo AutoModel's recipe): the encoder runs causally over the prompt, with
gradients, producing the KV cache the decoder reads, and its ordinary next-token loss is added; each example draws
t ~ U(0, 1) and every target token is replaced by a uniform random token with probability t; the decoder's
cross-entropy over the whole canvas is the diffusion loss (no 1/t weight). Self-conditioning is trained with
probability 0.5 per example: a first decoder pass without it (no gradient), then the training pass fed the first
pass's detached softmax (rows not chosen get zeros, which is exactly "no self-conditioning": the self-conditioning MLP
of a zero vector is zero).

`encode_train` / `decode_train` mirror `DiffusionGemmaText.encode` / `.decode` op for op (model.py stays the
inference code): the encoder also runs the last layer (inference skips it) to get hidden states for the next-token
loss, and the soft cap is applied out of place so autograd can differentiate it. tests/test_train.py checks that both
give the inference passes' numbers.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dgemma.config import ModelConfig
from dgemma.training import (LORA_TARGETS, TrainConfig, TrainLoop, adapter_config, adapter_file,  # noqa: F401
                             check_adapter_names, corrupt_tokens, draw_schedule, noise_rng, objective_inputs,
                             peft_key, read_adapter_config, step_seed, write_adapter, write_checkpoint)
from dgemma.training import diffusion_objective as core_objective

from .model import DiffusionGemmaText, KVState, sanitize_name

# ----------------------------------------------------------------------------------------------------------------
# Differentiable forward passes (mirrors of model.encode / model.decode)
# ----------------------------------------------------------------------------------------------------------------


def logits_train(model: DiffusionGemmaText, h: torch.Tensor) -> torch.Tensor:
    """`model.logits` with gradients (the soft cap out of place)."""
    return model.logits(h, inplace=False)


def encode_train(model: DiffusionGemmaText, ids: torch.Tensor, valid: torch.Tensor | None = None,
                 cache_length: int | None = None) -> tuple[KVState, torch.Tensor]:
    """`model.encode(ids, valid, None)` with gradients, also running the last layer: (the KV cache of the first
    `cache_length` positions (default all), the final-normed hidden states [B, T, H] for next-token logits).
    Causal attention means the cache of a prefix does not depend on what follows it, so the encoder may see
    prompt + target while the decoder reads only the prompt's cache."""
    if valid is None:
        valid = torch.ones_like(ids, dtype=torch.bool)
    return model.encode(ids, valid, None, cache_length=cache_length, return_hidden=True)


def decode_train(model: DiffusionGemmaText, canvas: torch.Tensor, state: KVState,
                 sc_probs: torch.Tensor | None = None) -> torch.Tensor:
    """`model.decode` with gradients: float32 soft-capped logits [B, C, V]."""
    return model.decode(canvas, state, sc_probs, inplace_logits=False)


def compile_hot_paths() -> None:
    """torch.compile the elementwise-heavy pieces of every layer (attention projections with their norms and RoPE,
    the router, the dense MLP, RMSNorm) for training: on CPU a step of the small Sudoku model spent more time in
    unfused elementwise kernels than in matmuls, and fusing them makes a step about an eighth faster. The experts
    stay eager (their per-expert split is data-dependent). Affects every model of this process; results are the
    same up to float rounding."""
    from . import model as m

    for cls, name in ((m.Attention, "project"), (m.Router, "forward"), (m.DenseMLP, "forward"),
                      (m.RMSNorm, "forward")):
        fn = getattr(cls, name)
        if not hasattr(fn, "_torchdynamo_orig_callable"):
            setattr(cls, name, torch.compile(fn, dynamic=True))


# ----------------------------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------------------------


def corrupt(targets: torch.Tensor, t: torch.Tensor, vocab_size: int, gen=None):
    """Replace each token of `targets` [B, C] by a uniform random token with probability t[b]; (noisy, replaced).
    `gen` a numpy Generator: the core's draws (`dgemma.training.corrupt_tokens`, what training uses, as the MLX
    recipe does); a torch.Generator (or None): drawn on the device."""
    if isinstance(gen, np.random.Generator):
        noisy, replaced = corrupt_tokens(targets.cpu().numpy(), t.cpu().numpy(), vocab_size, gen)
        return torch.from_numpy(noisy).to(targets.device), torch.from_numpy(replaced).to(targets.device)
    u = torch.rand(targets.shape, generator=gen, device=targets.device)
    rand = torch.randint(0, vocab_size, targets.shape, generator=gen, device=targets.device)
    replaced = u < t[:, None]
    return torch.where(replaced, rand, targets), replaced


def _select_rows(state: KVState, rows: torch.Tensor) -> KVState:
    """The cache of some batch rows (detached: it feeds only the no-gradient first pass)."""
    return KVState([k.detach().index_select(0, rows) for k in state.keys],
                   [v.detach().index_select(0, rows) for v in state.values],
                   state.valid.index_select(0, rows), state.length, state.has_padding)


def diffusion_loss(model: DiffusionGemmaText, prompts: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig,
                   gen: torch.Generator | None = None, prompt_valid: torch.Tensor | None = None,
                   t: torch.Tensor | None = None, sc_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Total loss and its parts for one batch: prompts [B, P], targets [B, C] (C = canvas length). `t` and
    `sc_mask` (which rows get self-conditioning) are drawn from `gen` unless given, then the corruption: from a numpy
    Generator as the core draws them (in `dgemma.training.draw_noise`'s order: the MLX recipe's noise for the same
    generator), from a torch.Generator on the device. The objective itself is the core's `diffusion_objective`
    over `TorchPasses`."""
    B = prompts.shape[0]
    V = model.cfg.vocab_size
    dev = prompts.device
    if prompt_valid is None:
        prompt_valid = torch.ones_like(prompts, dtype=torch.bool)
    if isinstance(gen, np.random.Generator):
        host_t, host_sc = draw_schedule(B, cfg, gen, None if t is None else t.cpu().numpy(),
                                        None if sc_mask is None else sc_mask.cpu().numpy())
        t, sc_mask = torch.from_numpy(host_t).to(dev), torch.from_numpy(host_sc).to(dev)
    if t is None:
        t = torch.rand(B, generator=gen, device=dev)
    if sc_mask is None:
        sc_mask = torch.rand(B, generator=gen, device=dev) < cfg.self_conditioning_p
    noisy, replaced = corrupt(targets, t, V, gen)

    inputs = objective_inputs(prompts.cpu().numpy(), targets.cpu().numpy(), sc_mask.cpu().numpy(), cfg,
                              prompt_valid.cpu().numpy())
    loss, terms = core_objective(TorchPasses(model, dev), inputs, noisy, targets, cfg)
    return loss, {"loss": float(loss.detach()), "decoder": float(terms["decoder"].detach()),
                  "encoder": float(terms["encoder"].detach()), "canvas_acc": float(terms["canvas_acc"]),
                  "noise": float(replaced.float().mean())}


class TorchPasses:
    """The PyTorch forward passes that `dgemma.training.diffusion_objective` runs (host arrays in, tensors out)."""

    def __init__(self, model: DiffusionGemmaText, device):
        self.model, self.device = model, device

    def _tensor(self, x, dtype=torch.long) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x), device=self.device, dtype=dtype)

    def encode(self, ids, valid, cache_length: int):
        return encode_train(self.model, self._tensor(ids), self._tensor(valid, torch.bool), cache_length=cache_length)

    def next_token_loss(self, hidden, ids, weight) -> torch.Tensor:
        logits = logits_train(self.model, hidden[:, :-1])
        nxt = self._tensor(ids)[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), nxt.reshape(-1), reduction="none")
        return (ce.view_as(nxt) * self._tensor(weight, torch.float32)).sum()

    def first_pass(self, noisy, state, rows, index) -> torch.Tensor:
        rows = self._tensor(rows)
        with torch.no_grad():
            probs = torch.softmax(decode_train(self.model, noisy.index_select(0, rows), _select_rows(state, rows)), -1)
            probs = torch.cat([probs, probs.new_zeros((1,) + probs.shape[1:])])
            return probs.index_select(0, self._tensor(index))

    def decode(self, noisy, state, sc_probs) -> torch.Tensor:
        return decode_train(self.model, noisy, state, sc_probs)

    def canvas_loss(self, logits, targets):
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        with torch.no_grad():
            return loss, (logits.argmax(-1) == targets).float().mean()


# ----------------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """y = base(x) + (x A^T B^T) * alpha / rank; A ~ kaiming-uniform, B = 0 (the wrapped layer's output at init)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def weight(self):  # what code reading `.weight` of the wrapped layer sees: the merged weight
        return self.merged_weight()

    def merged_weight(self) -> torch.Tensor:
        """W + B A alpha/r, summed in float64 and rounded once to W's dtype (what merge and export store)."""
        w = self.base.weight.double() + (self.lora_B.double() @ self.lora_A.double()) * self.scaling
        return w.to(self.base.weight.dtype)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=LORA_TARGETS, seed: int | None = None) -> list[str]:
    """Wrap every nn.Linear whose attribute name is in `targets` (self-conditioning MLP included; the packed experts
    and the router are not nn.Linear and stay frozen); freeze everything else. Returns the wrapped module names."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    if seed is not None:
        torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name in targets:
                setattr(parent, name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{parent_name}.{name}" if parent_name else name)
    if not wrapped:
        raise ValueError(f"no nn.Linear named {sorted(targets)} in the model")
    return wrapped


def save_lora(model: nn.Module, path: str | os.PathLike) -> Path:
    """The adapters only, with PEFT's names (`base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight`).
    `path` ending in .safetensors: that one file (rank/alpha/targets in its metadata); otherwise a folder with
    adapter_model.safetensors + adapter_config.json (PEFT's layout). The MLX recipe reads both."""
    from safetensors.torch import save_file

    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters")
    any_mod = next(iter(mods.values()))
    from dgemma.adapters import peft_tensors  # each layer's adapters under the reference's encoder name too

    tensors = peft_tensors({name: (m.lora_A.detach().cpu().contiguous(), m.lora_B.detach().cpu().contiguous())
                            for name, m in mods.items()}, copy=torch.clone)
    return write_adapter(path, adapter_config(any_mod.rank, any_mod.alpha, mods),
                         lambda file, metadata: save_file(tensors, file, metadata=metadata))


def load_lora(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load adapters written by `save_lora` of either backend (wrapping the model first if it has none); every
    adapter must match."""
    from safetensors import safe_open

    file = adapter_file(path)
    with safe_open(str(file), "pt") as f:
        meta = read_adapter_config(path, f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    mods = lora_modules(model)
    if not mods:
        apply_lora(model, int(meta["r"]), float(meta["lora_alpha"]), tuple(meta["target_modules"]))
        mods = lora_modules(model)
    check_adapter_names(file, tensors, {peft_key(n, w) for n in mods for w in "AB"})
    with torch.no_grad():
        for name, m in mods.items():
            m.lora_A.copy_(tensors[peft_key(name, "A")])
            m.lora_B.copy_(tensors[peft_key(name, "B")])
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += B A alpha/r) and unwrap it, in place."""
    for name, m in list(lora_modules(model).items()):
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        with torch.no_grad():
            m.base.weight.copy_(m.merged_weight())
        setattr(parent, name.rsplit(".", 1)[-1], m.base)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Building, loading and exporting models
# ----------------------------------------------------------------------------------------------------------------


def load_hf_tensors(model: DiffusionGemmaText, tensors: dict) -> None:
    """Copy Hugging Face-named tensors (numpy or torch) into the model (names through `sanitize`)."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    seen = set()
    with torch.no_grad():
        for name, value in tensors.items():
            ours = sanitize_name(name)
            if ours is None or ours not in params:
                continue
            params[ours].copy_(torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value))
            seen.add(ours)
    for i, layer in enumerate(model.layers):
        if f"layers.{i}.encoder_layer_scalar" not in seen:
            layer.encoder_layer_scalar.copy_(layer.layer_scalar)
    model.reset_rope()


def new_model(config: dict, seed: int = 0, device: str = "cpu") -> DiffusionGemmaText:
    """A fresh model with `dgemma.random_model`'s initialisation for the config.json dict `config`, float32."""
    from dgemma.random_model import random_weights

    cfg = ModelConfig.from_dict(config)
    model = DiffusionGemmaText(cfg)
    load_hf_tensors(model, random_weights(config["text_config"], seed))
    return model.to(device)


def load_model(folder: str | os.PathLike, device: str = "cpu") -> tuple[DiffusionGemmaText, dict]:
    """A trainable float32 model from a checkpoint folder (single-file or sharded safetensors), and its config."""
    from dgemma.checkpoint import Checkpoint

    ckpt = Checkpoint(folder)
    model = DiffusionGemmaText(ckpt.config)
    load_hf_tensors(model, {n: t.float() for n, t in ckpt.iter_tensors("pt")})
    return model.to(device), ckpt.raw_config


def hf_state_dict(model: DiffusionGemmaText) -> dict[str, torch.Tensor]:
    """The model's weights under the names save_pretrained writes (LoRA adapters merged in, the model untouched)."""
    mods = lora_modules(model)
    out = {}
    for name, value in model.state_dict().items():
        if ".lora_" in name:
            continue
        if ".base." in name:
            module = name.rsplit(".base.", 1)[0]
            name = name.replace(".base.", ".")
            value = mods[module].merged_weight()
        m = re.fullmatch(r"layers\.(\d+)\.encoder_layer_scalar", name)
        key = f"model.encoder.language_model.layers.{m.group(1)}.layer_scalar" if m else "model.decoder." + name
        out[key] = value.detach().float().cpu().contiguous()
    return out


def export_hf(model: DiffusionGemmaText, folder: str | os.PathLike, config: dict, generation_config: dict | None = None,
              write_tokenizer=None) -> Path:
    """Write a checkpoint folder `dgemma.load(folder)` reads: config.json, generation_config.json, model.safetensors
    (adapters merged), and the tokenizer files through `write_tokenizer(folder)`."""
    return write_checkpoint(folder, config, generation_config,
                            {k: v.numpy() for k, v in hf_state_dict(model).items()}, write_tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------------


class Trainer(TrainLoop):
    """AdamW on the trainable parameters (all of them, or the LoRA adapters). Every step's batch and noise are a
    function of (seed, step), so a resumed run takes exactly the steps an uninterrupted one would."""

    def __init__(self, model: DiffusionGemmaText, cfg: TrainConfig, model_config: dict | None = None):
        self.cfg = cfg
        self.device = torch.device(cfg.device or "cpu")
        self.model = model.to(self.device)
        self.model_config = model_config
        if cfg.lora_rank > 0 and not lora_modules(model):
            apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, seed=cfg.seed)
        elif cfg.lora_rank == 0:
            for p in model.parameters():
                p.requires_grad_(True)
        self.model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        self.history: list[dict] = []

    @contextlib.contextmanager
    def evaluating(self):
        """Evaluation runs in eval mode; training resumes in train mode."""
        self.model.eval()
        try:
            yield
        finally:
            self.model.train()

    def train_step(self, prompts, targets, gen=None, prompt_valid=None) -> dict:
        """One AdamW step on a batch (tensors or arrays [B, P] / [B, C]; `prompt_valid` [B, P] marks left padding);
        returns the loss parts. The noise comes from `gen`, by default the core's generator of (cfg.seed, step)
        (`dgemma.training.noise_rng`: the MLX recipe's draws, so a seed trains the same on both backends)."""
        prompts = torch.as_tensor(prompts, device=self.device, dtype=torch.long)
        targets = torch.as_tensor(targets, device=self.device, dtype=torch.long)
        if prompt_valid is not None:
            prompt_valid = torch.as_tensor(np.asarray(prompt_valid), device=self.device, dtype=torch.bool)
        if gen is None:
            gen = noise_rng(self.cfg.seed, self.step)
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss, parts = diffusion_loss(self.model, prompts, targets, self.cfg, gen, prompt_valid)
        loss.backward()
        if self.cfg.grad_clip:
            parts["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
        self.opt.step()
        self.step += 1
        parts["step"] = self.step
        parts["lr"] = self.lr_at(self.step - 1)
        self.history.append(parts)
        return parts

    @torch.no_grad()
    def eval_loss(self, prompts, targets, seed: int = 1234, prompt_valid=None) -> float:
        """The objective on a batch with fixed noise (t, replacements, self-conditioning coins from `seed`);
        `prompt_valid` [B, P] marks left padding."""
        prompts = torch.as_tensor(prompts, device=self.device, dtype=torch.long)
        targets = torch.as_tensor(targets, device=self.device, dtype=torch.long)
        if prompt_valid is not None:
            prompt_valid = torch.as_tensor(np.asarray(prompt_valid), device=self.device, dtype=torch.bool)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        loss, _ = diffusion_loss(self.model, prompts, targets, self.cfg, gen, prompt_valid)
        return float(loss)

    @torch.no_grad()
    def one_step_accuracy(self, prompts, targets, cells: int = 81, blanks=None, seed: int = 4321) -> dict:
        """Denoise a fully random canvas once (t = 1, no self-conditioning) and score its argmax: accuracy over the
        first `cells` positions, over `blanks` [B, cells] positions only when given, and whole-answer exact match."""
        prompts = torch.as_tensor(prompts, device=self.device, dtype=torch.long)
        targets = torch.as_tensor(targets, device=self.device, dtype=torch.long)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        noisy = torch.randint(0, self.model.cfg.vocab_size, targets.shape, generator=gen, device=self.device)
        state, _ = encode_train(self.model, prompts)
        pred = decode_train(self.model, noisy, state, None).argmax(-1)
        ok = (pred == targets)[:, :cells]
        out = {"cell_acc": float(ok.float().mean()), "exact": float(ok.all(-1).float().mean())}
        if blanks is not None:
            b = torch.as_tensor(np.asarray(blanks), device=self.device, dtype=torch.bool)
            out["blank_acc"] = float((ok & b).sum() / b.sum().clamp_min(1))
        return out

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """model (adapters included), optimizer and step in one file, written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {"step": self.step, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "train_config": asdict(self.cfg), "model_config": self.model_config, "history": self.history}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
        os.close(fd)
        torch.save(blob, tmp)
        os.replace(tmp, path)
        return path

    def load(self, path: str | os.PathLike) -> int:
        blob = torch.load(path, map_location=self.device, weights_only=False)
        saved = blob.get("train_config") or {}
        if int(saved.get("lora_rank", self.cfg.lora_rank)) != self.cfg.lora_rank:
            raise ValueError(f"{path}: saved with lora_rank={saved.get('lora_rank')}, this run has "
                             f"lora_rank={self.cfg.lora_rank}; resume with the same setting")
        self.model.load_state_dict(blob["model"])
        self.opt.load_state_dict(blob["optimizer"])
        self.step = int(blob["step"])
        self.history = list(blob.get("history", []))
        return self.step
