"""Reading any supported checkpoint (Hugging Face, MLX / mlx-lm quantized, dgemma CUDA FP8/int4, compressed-tensors
FP8) as logical Hugging Face tensors, a chunk of rows (dim 0) at a time, dequantized to float32 where stored quantized.

Shards are opened with safetensors' `safe_open` (memory-mapped) per logical tensor and closed after it, so mapped pages
of tensors already converted do not pile up in the process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dgemma.checkpoint import Checkpoint, TensorInfo
from dgemma.errors import CheckpointError

from . import quant
from .plan import FLOAT_ST, ST_BYTES, ST_FLOAT, LogicalInfo, numel

TORCH_FLOAT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Logical:
    name: str
    shape: tuple[int, ...]
    dtype: str                       # float dtype name (or safetensors code of a non-float tensor)
    kind: str                        # plain | mlx | fp8 | int4
    parts: dict[str, str]            # role -> stored tensor name
    bits: int | None = None
    group_size: int | None = None
    stored_bytes: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    def info(self) -> LogicalInfo:
        return LogicalInfo(self.name, self.shape, self.dtype)


class Source:
    """A checkpoint seen as logical tensors. `format` is hf | mlx | cuda."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.raw = ckpt.raw_config
        self.stored: dict[str, TensorInfo] = ckpt.tensors
        q = self.raw.get("quantization")
        qc = self.raw.get("quantization_config") or (self.raw.get("text_config") or {}).get("quantization_config")
        self.mlx_quant = q if isinstance(q, dict) and "bits" in q else None
        self.compressed = isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"
        if isinstance(qc, dict) and qc.get("quant_method") not in (None, "compressed-tensors") and not self.mlx_quant:
            raise CheckpointError(f"{ckpt.path}: quantization method {qc.get('quant_method')!r} is not supported "
                                  "(dgemma reads MLX affine, FP8 and its int4 layout)")
        dt = str(self.raw.get("dtype") or self.raw.get("torch_dtype") or "bfloat16")
        self.logical_dtype = dt if dt in FLOAT_ST else "bfloat16"
        self.tensors: dict[str, Logical] = {}
        self._build()
        kinds = {t.kind for t in self.tensors.values()}
        if self.mlx_quant or any(n.endswith((".experts.gate_up_proj.weight", ".experts.down_proj.weight"))
                                 for n in self.stored):
            self.format = "mlx"
        elif kinds & {"fp8", "int4"}:
            self.format = "cuda"
        else:
            self.format = "hf"

    # -- discovering logical tensors ----------------------------------------------------------------------------------
    def _size(self, name: str) -> int:
        i = self.stored[name]
        return numel(i.shape) * ST_BYTES.get(i.dtype, 1)

    def _mlx_params(self, module: str) -> tuple[int, int]:
        q = self.mlx_quant or {}
        over = q.get(module)
        if isinstance(over, dict):
            return int(over.get("bits", q.get("bits", 4))), int(over.get("group_size", q.get("group_size", 64)))
        return int(q.get("bits", 4)), int(q.get("group_size", 64))

    def _build(self) -> None:
        s = self.stored
        used: set[str] = set()
        # MLX affine: P.weight (uint32) + P.scales + P.biases
        for n in s:
            if not n.endswith(".scales"):
                continue
            base = n[: -len(".scales")]
            w, b = base + ".weight", base + ".biases"
            if w not in s:
                continue
            if b not in s:
                raise CheckpointError(f"{s[n].file}: {base} has scales but no biases (only MLX affine quantization "
                                      "is supported)")
            bits, group = self._mlx_params(base)
            K = s[w].shape[-1] * 32 // bits
            if s[n].shape[-1] * group != K:
                raise CheckpointError(f"{s[n].file}: {base}: scales {s[n].shape} do not match {bits}-bit weights "
                                      f"{s[w].shape} with group size {group} (config.json quantization block)")
            logical = base if base.endswith((".experts.gate_up_proj", ".experts.down_proj")) else w
            self.tensors[logical] = Logical(logical, tuple(s[w].shape[:-1]) + (K,), ST_FLOAT.get(s[n].dtype, "bfloat16"),
                                            "mlx", {"weight": w, "scales": n, "biases": b}, bits, group,
                                            self._size(w) + self._size(n) + self._size(b))
            used |= {w, n, b}
        # int4 (dgemma layout): X_packed + X_scale [+ X_shape]
        for n in s:
            if not n.endswith("_packed") or n in used:
                continue
            base = n[: -len("_packed")]
            sc = base + "_scale"
            if sc not in s:
                raise CheckpointError(f"{s[n].file}: {n} has no {sc}")
            K = s[n].shape[-1] * 2
            layout = ((self.raw.get("quantization_config") or {}).get("dgemma_layout") or {})
            group = int(layout.get("group_size") or quant.infer_group(K, s[sc].shape[-1]))
            parts = {"packed": n, "scale": sc}
            size = self._size(n) + self._size(sc)
            if base + "_shape" in s:
                parts["shape"] = base + "_shape"
                size += self._size(base + "_shape")
            self.tensors[base] = Logical(base, tuple(s[n].shape[:-1]) + (K,), self.logical_dtype, "int4", parts, 4,
                                         group, size)
            used |= set(parts.values())
        # FP8: X (float8) + X_scale
        for n, info in s.items():
            if n in used or not info.dtype.startswith("F8"):
                continue
            sc = n + "_scale"
            if sc not in s:
                raise CheckpointError(f"{info.file}: FP8 tensor {n} has no {sc}")
            self.tensors[n] = Logical(n, tuple(info.shape), self.logical_dtype, "fp8", {"weight": n, "scale": sc}, 8,
                                      None, self._size(n) + self._size(sc))
            used |= {n, sc}
        for n, info in s.items():
            if n in used:
                continue
            if n.endswith(("input_scale", "weight_zero_point", "_shape")) and self.compressed:
                continue  # static activation scales / zero points of compressed-tensors: not weights
            logical = n[: -len(".weight")] if n.endswith((".experts.gate_up_proj.weight", ".experts.down_proj.weight")) else n
            dtype = ST_FLOAT.get(info.dtype, info.dtype)
            self.tensors[logical] = Logical(logical, tuple(info.shape), dtype, "plain", {"weight": n}, stored_bytes=self._size(n))

    # -- reading ---------------------------------------------------------------------------------------------------
    def read_part(self, handles: dict, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        info = self.stored[name]
        f = info.file
        if f not in handles:
            from safetensors import safe_open

            try:
                handles[f] = safe_open(str(f), framework="pt")
            except (OSError, RuntimeError, ValueError) as e:
                raise CheckpointError(f"{f}: could not open ({e})") from None
        h = handles[f]
        try:
            if start is None or len(info.shape) == 0:
                return h.get_tensor(name)
            return h.get_slice(name)[start:stop]
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{f}: could not read tensor {name} ({e})") from None

    def read(self, t: Logical, handles: dict, start: int, stop: int) -> torch.Tensor:
        """Rows [start:stop] (dim 0) of a logical tensor: plain tensors in their stored dtype, quantized ones as
        float32."""
        if t.kind == "plain":
            return self.read_part(handles, t.parts["weight"], start, stop)
        if t.kind == "mlx":
            packed = self.read_part(handles, t.parts["weight"], start, stop)
            scales = self.read_part(handles, t.parts["scales"], start, stop)
            biases = self.read_part(handles, t.parts["biases"], start, stop)
            return quant.mlx_dequantize(packed, scales, biases, t.bits, t.group_size)
        if t.kind == "fp8":
            if "scale" not in t._cache:
                t._cache["scale"] = self.read_part(handles, t.parts["scale"])
            q = self.read_part(handles, t.parts["weight"], start, stop)
            try:
                return quant.fp8_dequantize(q, t._cache["scale"], t.shape, start, stop)
            except ValueError as e:
                raise CheckpointError(f"{self.stored[t.parts['scale']].file}: {t.name}: {e}") from None
        if t.kind == "int4":
            packed = self.read_part(handles, t.parts["packed"], start, stop)
            scale = self.read_part(handles, t.parts["scale"], start, stop)
            return quant.int4_dequantize(packed, scale, t.group_size)
        raise AssertionError(t.kind)  # pragma: no cover

    def file_of(self, t: Logical) -> Path:
        return self.stored[next(iter(t.parts.values()))].file
