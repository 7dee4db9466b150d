"""LoRA adapter files in PEFT's format, so that an adapter trained with dgemma (either backend) loads with
`peft.PeftModel.from_pretrained` onto transformers' DiffusionGemmaForBlockDiffusion, and one saved by PEFT loads in
dgemma. Imports neither torch nor mlx.

Names. dgemma's backbone is one set of layers that the encoder (prefill, commit) and the decoder (denoise) both run;
the reference has an encoder and a decoder module tree whose Linear layers share their weights
(`model.encoder.language_model.layers.N...` and `model.decoder.layers.N...`) but are separate modules, so PEFT puts a
separate adapter on each. A dgemma adapter of a layer linear is therefore written twice, under the decoder's and the
encoder's name (the same values), and the self-conditioning MLP (decoder only) once. On reading, the two copies must
be equal: dgemma cannot run different adapters in the two passes.

Targets. `target_modules` is a regular expression (PEFT full-matches a string against every module name) over the
language model's linear layers only: bare names (`q_proj`, ...) would also match the vision tower's
Gemma4ClippableLinear modules, which PEFT cannot adapt.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

PEFT_PREFIX = "base_model.model."
DECODER = "model.decoder."                     # the reference's decoder tree (our module names follow it)
ENCODER = "model.encoder.language_model."      # the reference's encoder tree: the same layers, weights shared
SHARED = "layers."                             # our modules the encoder runs too (not the self-conditioning MLP)


def peft_key(module: str, which: str, tree: str = DECODER) -> str:
    """PEFT's name for adapter `which` ("A" or "B") of one of our modules in one of the reference's trees, e.g.
    layers.0.self_attn.q_proj -> base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight."""
    return f"{PEFT_PREFIX}{tree}{module}.lora_{which}.weight"


def peft_names(module: str) -> list[str]:
    """The reference's module names for one of ours: the decoder's, and the encoder's for a shared layer."""
    return [DECODER + module] + ([ENCODER + module] if module.startswith(SHARED) else [])


def peft_tensors(adapters: dict, copy=lambda t: t) -> dict:
    """{our module: (A, B)} -> PEFT's tensors: every adapter under each of its reference names (`copy` makes the
    encoder's copy a tensor of its own where the framework's safetensors writer refuses shared storage)."""
    out = {}
    for module, (a, b) in adapters.items():
        for i, name in enumerate(peft_names(module)):
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a if i == 0 else copy(a)
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b if i == 0 else copy(b)
    return out


def _pattern(names) -> str:
    """One alternation over module names, each layer index generalised (layers.3.mlp.up_proj -> layers\\.\\d+...)."""
    parts = sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) for n in names})
    return "(?:" + "|".join(parts) + ")"


def target_regex(module_names) -> str:
    """PEFT's target_modules for our modules: their decoder names, and the encoder's names of the shared layers."""
    names = list(module_names)
    shared = [n for n in names if n.startswith(SHARED)]
    alternatives = [re.escape(DECODER) + _pattern(names)]
    if shared:
        alternatives.append(re.escape(ENCODER) + _pattern(shared))
    return "|".join(alternatives)


def adapter_config(rank: int, alpha: float, module_names) -> dict:
    """PEFT's adapter_config.json for LoRA adapters of rank `rank` (scale alpha / rank) on `module_names` (ours)."""
    return {"peft_type": "LORA", "r": int(rank), "lora_alpha": float(alpha), "lora_dropout": 0.0, "bias": "none",
            "target_modules": target_regex(module_names), "fan_in_fan_out": False, "use_rslora": False,
            "task_type": None, "inference_mode": True}


# One module of each kind a LoRA can adapt, to see which kinds a target_modules regex selects.
_KINDS = ([f"layers.0.self_attn.{p}_proj" for p in "qkvo"] + [f"layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
          + [f"self_conditioning.{p}_proj" for p in ("gate", "up", "down")])


def target_names(target_modules) -> tuple[str, ...]:
    """The attribute names (q_proj, ...) an adapter's target_modules selects: for a regex (PEFT full-matches it), the
    kinds of our modules whose reference name it matches; for a list, each entry's last component."""
    if isinstance(target_modules, str):
        return tuple(sorted({m.rsplit(".", 1)[-1] for m in _KINDS for name in peft_names(m)
                             if re.fullmatch(target_modules, name)}))
    return tuple(sorted({str(t).rsplit(".", 1)[-1] for t in target_modules or ()}))


def adapter_file(path: str | os.PathLike) -> Path:
    """The safetensors file of an adapter path: the path itself if it ends in .safetensors, else the PEFT folder's
    adapter_model.safetensors."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / "adapter_model.safetensors"


def write_adapter(path: str | os.PathLike, config: dict, save_file) -> Path:
    """Write adapters through `save_file(file, metadata)` (the framework's safetensors writer, closed over the
    tensors); a folder also gets adapter_config.json, as PEFT writes it."""
    path = Path(path)
    file = adapter_file(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file(str(file), {"adapter_config": json.dumps(config)})
    if file != path:
        (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def read_adapter_config(path: str | os.PathLike, metadata: dict | None) -> dict:
    """rank, alpha and targets of an adapter: from the file's metadata, else the folder's adapter_config.json (what
    PEFT writes). `target_modules` comes back as attribute names (q_proj, ...), what the recipes' apply_lora takes."""
    meta = json.loads((metadata or {}).get("adapter_config", "{}"))
    folder_config = Path(path) / "adapter_config.json"
    if not meta and folder_config.exists():
        meta = json.loads(folder_config.read_text())
    unsupported = [k for k in ("use_rslora", "use_dora", "lora_bias", "rank_pattern", "alpha_pattern",
                               "modules_to_save", "layers_to_transform") if meta.get(k)]
    if meta.get("bias", "none") != "none":
        unsupported.append(f"bias={meta['bias']}")
    if unsupported:
        raise ValueError(f"{path}: LoRA options dgemma's adapters do not have: {', '.join(unsupported)} (dgemma "
                         "adds B A alpha / r to each targeted linear, one rank and alpha for all)")
    if "target_modules" in meta:
        meta = dict(meta, target_modules=target_names(meta["target_modules"]))
    return meta


def check_adapter_names(file, have, want) -> None:
    """`have` (the file's tensors by name) must hold exactly the decoder-tree adapters `want`, plus, optionally (files
    from PEFT and from this version of dgemma), the encoder tree's copies of the shared layers' ones, equal to them."""
    have_names = set(have)
    encoder = {k.replace(PEFT_PREFIX + DECODER, PEFT_PREFIX + ENCODER, 1): k for k in want
               if k.startswith(PEFT_PREFIX + DECODER + SHARED)}
    if encoder and not have_names & set(encoder) and _written_by_peft(file):
        raise ValueError(f"{file}: the adapter adapts the decoder's layers only; dgemma runs one set of layers for the "
                         "encoder and the decoder, so it needs the encoder's adapters too, tied to the decoder's")
    expected = set(want) | (set(encoder) if have_names & set(encoder) else set())
    extra, missing = have_names - expected, expected - have_names
    if extra or missing:
        raise ValueError(f"{file}: adapters do not match the model (extra {sorted(extra)[:3]}, "
                         f"missing {sorted(missing)[:3]})")
    for enc, dec in encoder.items():
        if enc in have and not _equal(have[enc], have[dec]):
            module = dec[len(PEFT_PREFIX + DECODER):].rsplit(".lora_", 1)[0]
            raise ValueError(f"{file}: {module} has different adapters in the encoder and the decoder; dgemma runs one "
                             "set of layers for both, so their adapters must be equal")


def _written_by_peft(file) -> bool:
    """PEFT records its version in adapter_config.json; dgemma's earlier files (decoder names only, applied to both
    passes) do not."""
    config = Path(file).parent / "adapter_config.json"
    return config.exists() and "peft_version" in json.loads(config.read_text())


def _equal(a, b) -> bool:
    """Exact equality of two framework tensors (torch CPU tensors and MLX arrays both convert to numpy)."""
    if hasattr(a, "float") and hasattr(a, "detach"):  # torch: bf16 has no numpy dtype
        a, b = a.detach().float(), b.detach().float()
    return np.array_equal(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32))
