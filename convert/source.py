"""Reading any supported checkpoint (Hugging Face, MLX / mlx-lm quantized, dgemma CUDA FP8/int4, compressed-tensors
FP8) as logical Hugging Face tensors, a chunk of rows (dim 0) at a time, dequantized to float32 where stored quantized.

Shards are opened with safetensors' `safe_open` (memory-mapped) per logical tensor and closed after it, so mapped pages
of tensors already converted do not pile up in the process.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dgemma.checkpoint import Checkpoint, TensorInfo
from dgemma.errors import CheckpointError

from . import quant
from .plan import FLOAT_ST, ST_BYTES, ST_FLOAT, LogicalInfo, numel

TORCH_FLOAT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ST_TORCH = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U8": torch.uint8, "I8": torch.int8,
            "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        ST_TORCH[_code] = getattr(torch, _name)


def _read_offsets(fd: int) -> dict[str, tuple[int, int]]:
    """name -> absolute [begin, end) byte range of each tensor's data in a safetensors file."""
    head = os.pread(fd, 8, 0)
    if len(head) != 8:
        raise ValueError("not a safetensors file (shorter than its header)")
    n = int.from_bytes(head, "little")
    if n > 100 << 20:
        raise ValueError("not a safetensors file (header too large)")
    raw = os.pread(fd, n, 8)
    if len(raw) != n:
        raise ValueError("not a safetensors file (truncated header)")
    header = json.loads(raw)
    base = 8 + n
    return {k: (base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def _pread_exact(fd: int, buf, offset: int) -> None:
    view = memoryview(buf).cast("B")
    while view:
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise EOFError("file is shorter than its header says")
        view, offset = view[n:], offset + n


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
        self._fds: dict[Path, int] = {}
        self._data_offsets: dict[Path, dict[str, tuple[int, int]]] = {}
        self._lock = threading.Lock()
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
    # Rows are read with os.preadv straight into a fresh tensor (no memory map: nothing but the chunk becomes resident,
    # and the GIL is released while the kernel copies, so reads overlap the quantization of other chunks). Positional
    # reads on one descriptor per shard are thread-safe. Without preadv (old macOS) safetensors' safe_open is used.
    def _fd(self, f: Path) -> int:
        fd = self._fds.get(f)
        if fd is None:
            with self._lock:
                fd = self._fds.get(f)
                if fd is None:
                    try:
                        fd = os.open(str(f), os.O_RDONLY)
                        self._data_offsets[f] = _read_offsets(fd)
                    except (OSError, ValueError) as e:
                        if fd is not None:
                            os.close(fd)
                        raise CheckpointError(f"{f}: could not open ({e})") from None
                    self._fds[f] = fd
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()

    def read_part(self, handles: dict, name: str, start: int | None = None, stop: int | None = None,
                  flat: bool = False) -> torch.Tensor:
        """Rows [start:stop] of a stored tensor along dim 0, or, with `flat`, of its [-1, last dim] view."""
        info = self.stored[name]
        dtype = ST_TORCH.get(info.dtype)
        if dtype is None or not hasattr(os, "preadv"):
            return self._read_part_safe_open(handles, name, start, stop, flat)
        f = info.file
        fd = self._fd(f)
        shape = tuple(info.shape)
        item = ST_BYTES[info.dtype]
        begin, end = self._data_offsets[f].get(name, (None, None))
        if begin is None or end - begin != numel(shape) * item:
            raise CheckpointError(f"{f}: could not read tensor {name} (its header entry does not match the index)")
        if start is not None and shape:
            if flat and len(shape) > 1:
                row_shape, n_rows = (shape[-1],), numel(shape[:-1])
            else:
                row_shape, n_rows = shape[1:], shape[0]
            start, stop = max(0, start), min(n_rows, stop if stop is not None else n_rows)
            stop = max(start, stop)
            out_shape = (stop - start,) + tuple(row_shape)
            begin += start * numel(row_shape) * item
        else:
            out_shape = shape
        out = torch.empty(out_shape, dtype=dtype)
        n = out.numel() * item
        if n:
            try:
                _pread_exact(fd, out.reshape(-1).view(torch.uint8).numpy(), begin)
            except (OSError, EOFError) as e:
                raise CheckpointError(f"{f}: could not read tensor {name} ({e})") from None
        return out

    def _read_part_safe_open(self, handles: dict, name: str, start, stop, flat: bool) -> torch.Tensor:
        info = self.stored[name]
        f = info.file
        with self._lock:  # safe_open handles are not shared across threads
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
                if flat and len(info.shape) > 2:
                    K = info.shape[-1]
                    inner = numel(info.shape[1:-1])
                    d0, d1 = start // inner, -(-stop // inner)
                    block = h.get_slice(name)[d0:d1].reshape(-1, K)
                    return block[start - d0 * inner: stop - d0 * inner].clone()
                x = h.get_slice(name)[start:stop]
                return x.reshape(-1, info.shape[-1]) if flat and len(info.shape) > 1 else x
            except (OSError, RuntimeError, ValueError) as e:
                raise CheckpointError(f"{f}: could not read tensor {name} ({e})") from None

    def read(self, t: Logical, handles: dict, start: int, stop: int, flat: bool = False) -> torch.Tensor:
        """Rows [start:stop] (dim 0; with `flat`, rows of the [-1, last dim] view, for kinds plain, mlx and int4) of a
        logical tensor: plain tensors in their stored dtype, quantized ones as float32."""
        if t.kind == "plain":
            return self.read_part(handles, t.parts["weight"], start, stop, flat)
        if t.kind == "mlx":
            packed = self.read_part(handles, t.parts["weight"], start, stop, flat)
            scales = self.read_part(handles, t.parts["scales"], start, stop, flat)
            biases = self.read_part(handles, t.parts["biases"], start, stop, flat)
            return quant.mlx_dequantize(packed, scales, biases, t.bits, t.group_size)
        if t.kind == "fp8":
            if flat:
                raise AssertionError("fp8 sources are read by dim-0 rows")
            if "scale" not in t._cache:
                t._cache["scale"] = self.read_part(handles, t.parts["scale"])
            q = self.read_part(handles, t.parts["weight"], start, stop)
            try:
                return quant.fp8_dequantize(q, t._cache["scale"], t.shape, start, stop)
            except ValueError as e:
                raise CheckpointError(f"{self.stored[t.parts['scale']].file}: {t.name}: {e}") from None
        if t.kind == "int4":
            packed = self.read_part(handles, t.parts["packed"], start, stop, flat)
            scale = self.read_part(handles, t.parts["scale"], start, stop, flat)
            return quant.int4_dequantize(packed, scale, t.group_size)
        raise AssertionError(t.kind)  # pragma: no cover

    def file_of(self, t: Logical) -> Path:
        return self.stored[next(iter(t.parts.values()))].file
