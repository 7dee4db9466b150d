"""Reading any supported checkpoint (Hugging Face, MLX / mlx-lm quantized, dgemma CUDA FP8/int4, compressed-tensors
FP8) as logical Hugging Face tensors, a chunk of rows (dim 0) at a time, dequantized to float32 where stored quantized.

Shards are opened with safetensors' `safe_open` (memory-mapped) per logical tensor and closed after it, so mapped pages
of tensors already converted do not pile up in the process.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dgemma.backends.cuda.quantized import (EXPERT_SLICE, checkpoint_group_size, dequantize_fp8, dequantize_int4,
                                            infer_group)
from dgemma.checkpoint import Checkpoint, TensorInfo, _safetensors_header
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


def _read_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """name -> absolute [begin, end) byte range of each tensor's data in a safetensors file, from the checkpoint's
    header reader. The data section ends the file (the safetensors format leaves nothing after it, and its reader
    rejects files whose tensors do not cover it exactly), so it starts at the file size minus the tensors' extent."""
    header = _safetensors_header(path)
    tensors = {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}
    base = path.stat().st_size - max((int(end) for _, end in tensors.values()), default=0)
    return {k: (base + int(begin), base + int(end)) for k, (begin, end) in tensors.items()}


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
    kind: str                        # plain | mlx | fp8 | int4 | experts (per-expert slices, each one of the others)
    parts: dict[str, str]            # role -> stored tensor name
    bits: int | None = None
    group_size: int | None = None
    stored_bytes: int = 0
    tiles: list["Logical"] = field(default_factory=list)  # experts: the slices tiling the [-1, last dim] rows
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
        elif kinds & {"fp8", "int4", "experts"}:
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
        # int4: compressed-tensors' P.weight_packed (int32, 8 per word) or dgemma's earlier X_packed (uint8, 2 per
        # byte: the same bytes) + scale [+ shape]
        for n in s:
            if not n.endswith("_packed") or n in used:
                continue
            base = n[: -len("_packed")]
            sc = base + "_scale"
            if sc not in s:
                raise CheckpointError(f"{s[n].file}: {n} has no {sc}")
            K = s[n].shape[-1] * (8 if s[n].dtype == "I32" else 2)
            group = int(checkpoint_group_size(self.ckpt) or infer_group(K, s[sc].shape[-1]))
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
        self._gather_experts()

    def _gather_experts(self) -> None:
        """Per-expert linears (`...experts.E.gate_proj.weight`, ..., compressed-tensors' layout of the packed experts)
        become one logical `...experts.gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I] whose rows they tile."""
        found: dict[tuple[str, str], dict[tuple[int, str], Logical]] = {}
        for name in list(self.tensors):
            m = EXPERT_SLICE.match(name)
            if m:
                which = "down_proj" if m["proj"] == "down" else "gate_up_proj"
                found.setdefault((m["base"], which), {})[(int(m["e"]), m["proj"])] = self.tensors.pop(name)
        for (base, which), slices in found.items():
            projs = ("down",) if which == "down_proj" else ("gate", "up")
            order = [(e, p) for e in range(1 + max(e for e, _ in slices)) for p in projs]
            missing = [k for k in order if k not in slices]
            first = next(iter(slices.values()))
            if missing:
                raise CheckpointError(f"{self.file_of(first)}: {base}: expert {missing[0][0]} has no "
                                      f"{missing[0][1]}_proj")
            tiles = [slices[k] for k in order]
            if len({t.shape for t in tiles}) != 1 or len(first.shape) != 2:
                raise CheckpointError(f"{self.file_of(first)}: {base}: the experts' {which} slices differ in shape")
            rows, K = first.shape
            name = f"{base}.{which}"
            self.tensors[name] = Logical(name, (len(order) // len(projs), rows * len(projs), K), first.dtype, "experts",
                                         first.parts, first.bits, first.group_size,
                                         sum(t.stored_bytes for t in tiles), tiles=tiles)

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
                    self._data_offsets[f] = _read_offsets(f)  # a CheckpointError naming the file if corrupt
                    try:
                        fd = os.open(str(f), os.O_RDONLY)
                    except OSError as e:
                        raise CheckpointError(f"{f}: could not open ({e.strerror or e})") from None
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
                return dequantize_fp8(q, t._cache["scale"], torch.float32, t.shape, start, stop)
            except ValueError as e:
                raise CheckpointError(f"{self.stored[t.parts['scale']].file}: {t.name}: {e}") from None
        if t.kind == "int4":
            packed = self.read_part(handles, t.parts["packed"], start, stop, flat)
            scale = self.read_part(handles, t.parts["scale"], start, stop, flat)
            return dequantize_int4(packed, scale, torch.float32, group_size=t.group_size)
        if t.kind == "experts":
            return self._read_experts(t, handles, start, stop)
        raise AssertionError(t.kind)  # pragma: no cover

    def _read_experts(self, t: Logical, handles: dict, start: int, stop: int) -> torch.Tensor:
        """Rows [start:stop] of a gathered expert tensor's [-1, last dim] view, from the slices they fall in."""
        rows = t.tiles[0].shape[0]
        pieces = []
        for i in range(start // rows, -(-stop // rows)):
            a, b = max(start, i * rows) - i * rows, min(stop, (i + 1) * rows) - i * rows
            pieces.append(self.read(t.tiles[i], handles, a, b, flat=t.tiles[i].kind != "fp8").float())
        return torch.cat(pieces) if pieces else torch.empty(0, t.shape[-1])

    def file_of(self, t: Logical) -> Path:
        return self.stored[next(iter(t.parts.values()))].file
