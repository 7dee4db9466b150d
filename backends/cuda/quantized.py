"""Loading the quantized CUDA checkpoints that `dgemma convert --to cuda --quant fp8|int4` writes, and the FP8
checkpoints published in compressed-tensors format (`X.weight` float8_e4m3fn + `X.weight_scale`,
config `quantization_config.quant_method == "compressed-tensors"`).

Tensor layout (see dgemma.convert.plan):
  FP8   X float8_e4m3fn [..., out, in] + X_scale float32: per output channel [..., out, 1] (or [..., out]),
        per tensor (one value), per group [..., out, in/g] or 2-D blocks [out/b0, in/b1]; w = X * scale.
  int4  X_packed uint8 [..., out, in/2] (byte j: element 2j in the low nibble, 2j+1 in the high one, each u = q + 8)
        + X_scale [..., out, in/group] + X_shape int64; w = (u - 8) * scale. Used for the packed experts.

Two ways to use them in TorchBackend:
  1. dequantize on load (simplest, any device, full bf16 memory): replace `checkpoint.iter_tensors("pt", names)` with
     `iter_dense_tensors(checkpoint, names)` and build `names` from `logical_names(checkpoint)`; every tensor then
     arrives dense under its Hugging Face name, exactly as from a bf16 checkpoint.
  2. keep them quantized in memory: after `model.to_empty(...)`, call
     `install_quantized_modules(model, checkpoint, sanitize, device, dtype)`; it swaps in `FP8Linear` (weights stay
     FP8: `torch._scaled_mm` with per-token FP8 activations on GPUs that support it, checked once per device against
     the dequantized result; elsewhere it dequantizes per call) and `Int4Experts` (weights stay int4; each call
     dequantizes only the experts the batch routes to, one at a time, so the extra memory is one expert's weights),
     loads their tensors and returns the sanitized names it loaded, which the backend's loop then skips.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.convert.quant import infer_group

from .model import Experts

FP8_MAX = 448.0


# -- dequantization ---------------------------------------------------------------------------------------------------
def _expand_scale(scale: torch.Tensor, shape) -> torch.Tensor:
    s = scale.float()
    shape = tuple(shape)
    if s.numel() == 1:
        return s.reshape([1] * len(shape))
    C = shape[-1]
    if tuple(s.shape) == shape[:-1]:
        return s.unsqueeze(-1)
    if s.ndim == len(shape) and tuple(s.shape[:-1]) == shape[:-1]:
        return s if s.shape[-1] == 1 else s.repeat_interleave(-(-C // s.shape[-1]), dim=-1)[..., :C]
    if s.ndim == 2 and len(shape) == 2:  # 2-D blocks
        b0, b1 = -(-shape[0] // s.shape[0]), -(-C // s.shape[1])
        return s.repeat_interleave(b0, 0)[: shape[0]].repeat_interleave(b1, 1)[:, :C]
    raise ValueError(f"cannot broadcast a scale of shape {tuple(scale.shape)} onto a weight of shape {shape}")


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    return (weight.float() * _expand_scale(scale.to(weight.device), weight.shape)).to(dtype)


def checkpoint_group_size(checkpoint) -> int | None:
    """The int4 group size recorded in config.json (dgemma_layout), if any."""
    qc = checkpoint.raw_config.get("quantization_config") or {}
    return (qc.get("dgemma_layout") or {}).get("group_size")


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16, shape=None,
                    group_size: int | None = None) -> torch.Tensor:
    """The last group may be shorter than group_size (K = 704 with groups of 128): pass group_size when known."""
    p = packed.to(torch.int16)
    q = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*p.shape[:-1], -1).float() - 8.0
    K = q.shape[-1]
    g = group_size or infer_group(K, scale.shape[-1])
    w = q * scale.float().repeat_interleave(g, dim=-1)[..., :K]
    if shape is not None and tuple(int(s) for s in shape) != tuple(w.shape):
        raise ValueError(f"int4 tensor unpacks to {tuple(w.shape)}, its _shape says {tuple(int(s) for s in shape)}")
    return w.to(dtype)


def load_quantized_tensor(name: str, tensors: Mapping[str, torch.Tensor], dtype=torch.bfloat16,
                          group_size: int | None = None) -> torch.Tensor:
    """The dense tensor for logical (Hugging Face) name `name`, given its stored components by stored name:
    `name` (+ `name_scale`) for FP8 or plain, `name_packed` + `name_scale` (+ `name_shape`) for int4 (group_size:
    `checkpoint_group_size(checkpoint)`)."""
    if name + "_packed" in tensors:
        return dequantize_int4(tensors[name + "_packed"], tensors[name + "_scale"], dtype, tensors.get(name + "_shape"),
                               group_size)
    w = tensors[name]
    if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        if name + "_scale" not in tensors:
            raise KeyError(f"{name} is FP8 but {name}_scale is missing")
        return dequantize_fp8(w, tensors[name + "_scale"], dtype)
    return w.to(dtype) if w.is_floating_point() else w


# -- which stored tensors make up each logical tensor -----------------------------------------------------------------
@dataclass
class QuantizedEntry:
    name: str            # logical (Hugging Face) name
    kind: str            # plain | fp8 | int4
    parts: list[str]     # stored names


def _group(checkpoint) -> dict[str, QuantizedEntry]:
    st = checkpoint.tensors
    out: dict[str, QuantizedEntry] = {}
    used: set[str] = set()
    for n in st:
        if n.endswith("_packed") and n[:-7] + "_scale" in st:
            base = n[:-7]
            parts = [n, base + "_scale"] + ([base + "_shape"] if base + "_shape" in st else [])
            out[base] = QuantizedEntry(base, "int4", parts)
            used |= set(parts)
    for n, info in st.items():
        if n not in used and info.dtype.startswith("F8"):
            out[n] = QuantizedEntry(n, "fp8", [n, n + "_scale"])
            used |= {n, n + "_scale"}
    for n in st:
        if n not in used and not n.endswith(("input_scale", "weight_zero_point")):
            out[n] = QuantizedEntry(n, "plain", [n])
    return out


def quantization_kind(checkpoint) -> str | None:
    """'int4' / 'fp8' when the checkpoint stores such tensors (int4 wins when both), else None."""
    kinds = {e.kind for e in _group(checkpoint).values()}
    return "int4" if "int4" in kinds else ("fp8" if "fp8" in kinds else None)


def logical_names(checkpoint) -> list[str]:
    return list(_group(checkpoint))


def iter_dense_tensors(checkpoint, names=None, dtype=None, device=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Like `Checkpoint.iter_tensors("pt", names)` but under logical names, quantized tensors dequantized (to `dtype`,
    default bfloat16; plain tensors keep their dtype unless `dtype` is given). One tensor in memory at a time."""
    from safetensors import safe_open

    from dgemma.errors import CheckpointError

    entries = _group(checkpoint)
    handles: dict = {}
    try:
        for name, e in entries.items():
            if names is not None and name not in names:
                continue
            comps = {}
            for part in e.parts:
                if part not in checkpoint.tensors:
                    raise CheckpointError(f"{checkpoint.path}: {name} is quantized but {part} is missing")
                f = checkpoint.tensors[part].file
                if f not in handles:
                    handles[f] = safe_open(str(f), framework="pt", device="cpu")
                comps[part] = handles[f].get_tensor(part)
            if e.kind == "plain":
                t = comps[name]
                t = t.to(dtype) if (dtype is not None and t.is_floating_point()) else t
            else:
                t = load_quantized_tensor(name, comps, dtype or torch.bfloat16, checkpoint_group_size(checkpoint))
            yield name, (t.to(device) if device is not None else t)
    finally:
        handles.clear()


# -- modules that keep the weights quantized ---------------------------------------------------------------------------
_SCALED_MM_OK: dict[str, bool] = {}


def fp8_matmul_supported(device: torch.device) -> bool:
    """torch._scaled_mm with row-wise scales: CUDA, compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _fp8_mm(x2: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out_dtype) -> torch.Tensor:
    a_scale = (x2.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    xq = (x2.float() / a_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return torch._scaled_mm(xq, w.t(), scale_a=a_scale, scale_b=w_scale.reshape(1, -1).float(), out_dtype=out_dtype)


def _scaled_mm_ok(device: torch.device) -> bool:
    key = str(device)
    if key not in _SCALED_MM_OK:
        ok = False
        if fp8_matmul_supported(device):
            try:
                g = torch.Generator(device=device).manual_seed(0)
                x = torch.randn(32, 256, device=device, generator=g).bfloat16()
                w = torch.randn(128, 256, device=device, generator=g) / 16
                s = (w.abs().amax(-1, keepdim=True) / FP8_MAX)
                wq = (w / s).to(torch.float8_e4m3fn)
                got = _fp8_mm(x, wq, s, torch.bfloat16).float()
                want = F.linear(x.float(), dequantize_fp8(wq, s, torch.float32))
                ok = bool(((got - want).abs().max() <= 0.05 * want.abs().max() + 1e-3).item())
            except Exception:  # no kernel for this arch / build
                ok = False
        _SCALED_MM_OK[key] = ok
    return _SCALED_MM_OK[key]


class FP8Linear(nn.Module):
    """y = x @ (W_fp8 * scale).T with W kept in FP8 (1 byte per weight)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, compute_dtype=torch.bfloat16):
        super().__init__()
        self.register_buffer("weight", weight)
        s = scale.float().to(weight.device)
        if s.numel() == 1:
            s = s.reshape(1, 1).expand(weight.shape[0], 1)
        elif s.numel() == weight.shape[0]:
            s = s.reshape(-1, 1)
        else:  # per group / per block: dequantized per call
            s = _expand_scale(s, weight.shape)
        self.register_buffer("weight_scale", s.contiguous())
        self.compute_dtype = compute_dtype
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x):
        per_row = self.weight_scale.shape == (self.out_features, 1)
        if (per_row and x.dtype == torch.bfloat16 and self.in_features % 16 == 0 and self.out_features % 16 == 0
                and _scaled_mm_ok(x.device)):
            x2 = x.reshape(-1, self.in_features)
            return _fp8_mm(x2, self.weight, self.weight_scale, x.dtype).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, (self.weight.to(torch.float32) * self.weight_scale).to(x.dtype))


class Int4Experts(Experts):
    """Drop-in for model.Experts with int4 gate_up_proj / down_proj; dequantizes only the experts a call uses."""

    dense = False

    def __init__(self, gate_up: tuple[torch.Tensor, torch.Tensor], down: tuple[torch.Tensor, torch.Tensor],
                 group_size: int | None = None):
        nn.Module.__init__(self)
        self.group_size = group_size
        self.register_buffer("gate_up_packed", gate_up[0])
        self.register_buffer("gate_up_scale", gate_up[1])
        self.register_buffer("down_packed", down[0])
        self.register_buffer("down_scale", down[1])
        self.num_experts = gate_up[0].shape[0]

    def expert(self, e, dtype):
        return (dequantize_int4(self.gate_up_packed[e], self.gate_up_scale[e], dtype, group_size=self.group_size),
                dequantize_int4(self.down_packed[e], self.down_scale[e], dtype, group_size=self.group_size))


class FP8Experts(Experts):
    """Drop-in for model.Experts with FP8 gate_up_proj / down_proj (per-row scales), dequantized per used expert."""

    dense = False

    def __init__(self, gate_up: tuple[torch.Tensor, torch.Tensor], down: tuple[torch.Tensor, torch.Tensor]):
        nn.Module.__init__(self)
        self.register_buffer("gate_up_proj", gate_up[0])
        self.register_buffer("gate_up_scale", gate_up[1].float())
        self.register_buffer("down_proj", down[0])
        self.register_buffer("down_scale", down[1].float())
        self.num_experts = gate_up[0].shape[0]

    def expert(self, e, dtype):
        return (dequantize_fp8(self.gate_up_proj[e], self.gate_up_scale[e], dtype),
                dequantize_fp8(self.down_proj[e], self.down_scale[e], dtype))


def install_quantized_modules(model: nn.Module, checkpoint, sanitize, device, dtype=torch.bfloat16) -> set[str]:
    """Swap FP8Linear / Int4Experts / FP8Experts into `model` for every quantized tensor of `checkpoint` and load
    them; returns the sanitized parameter names now loaded (the caller skips them and counts them as present)."""
    entries = {n: e for n, e in _group(checkpoint).items() if e.kind != "plain" and sanitize(n) is not None}
    loaded: set[str] = set()
    if not entries:
        return loaded
    from safetensors import safe_open

    handles: dict = {}

    def get(part):
        f = checkpoint.tensors[part].file
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt", device="cpu")
        return handles[f].get_tensor(part).to(device)

    experts: dict[str, dict[str, QuantizedEntry]] = {}
    for name, e in entries.items():
        ours = sanitize(name)
        if ours.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            mod, _, param = ours.rpartition(".")
            experts.setdefault(mod, {})[param] = e
            continue
        if not ours.endswith(".weight") or e.kind != "fp8":
            raise ValueError(f"{name}: no quantized module for this tensor")
        mod_path = ours[: -len(".weight")]
        parent_path, _, attr = mod_path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, attr, FP8Linear(get(name), get(name + "_scale"), dtype))
        loaded.add(ours)
    for mod, parts in experts.items():
        if set(parts) != {"gate_up_proj", "down_proj"} or len({p.kind for p in parts.values()}) != 1:
            raise ValueError(f"{mod}: gate_up_proj and down_proj must be quantized the same way")
        kind = parts["gate_up_proj"].kind
        pair = {}
        for p, e in parts.items():
            pair[p] = (get(e.name + "_packed"), get(e.name + "_scale")) if kind == "int4" else (get(e.name), get(e.name + "_scale"))
        parent_path, _, attr = mod.rpartition(".")
        new = (Int4Experts(pair["gate_up_proj"], pair["down_proj"], checkpoint_group_size(checkpoint)) if kind == "int4"
               else FP8Experts(pair["gate_up_proj"], pair["down_proj"]))
        setattr(model.get_submodule(parent_path), attr, new)
        loaded |= {mod + ".gate_up_proj", mod + ".down_proj"}
    handles.clear()
    return loaded
