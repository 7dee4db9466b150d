"""Loading quantized checkpoints in compressed-tensors' layout (what `dgemma convert --to cuda --quant fp8|int4`
writes, and what llm-compressor / compressed-tensors write for vLLM), plus the layout earlier dgemma versions wrote.
The one copy of the FP8 / int4 dequantization math (PyTorch); the converter reads quantized sources through it.

Tensor layouts (see dgemma.convert.plan):
  FP8          P.weight float8_e4m3fn [out, in] + P.weight_scale float32: per output channel [out, 1] (or [out]), per
               tensor (one value), per group [out, in/g] or 2-D blocks [out/b0, in/b1]; w = q * scale.
  int4         P.weight_packed int32 [out, in/8] (value 8j+i in bits 4i..4i+3 of word j, each u = q + 8; the same bytes
               as two values per uint8, the even one in the low nibble) + P.weight_scale [out, in/group] +
               P.weight_shape int64; w = (u - 8) * scale (compressed-tensors "pack-quantized", symmetric).
  experts      the packed experts as per-expert linears `...experts.E.{gate,up,down}_proj`, each one of the above (or
               float): gathered back into gate_up_proj [E, 2I, H] / down_proj [E, H, I].
  earlier dgemma: 3-D FP8 experts `...experts.gate_up_proj` + `_scale`; int4 `X_packed` uint8 + `X_scale` + `X_shape`.

Two ways to use them in TorchBackend:
  1. dequantize on load: `iter_dense_tensors(checkpoint, names)` yields every tensor dense under its Hugging Face
     name, as from a bf16 checkpoint (names from `logical_names(checkpoint)`).
  2. keep them quantized in memory: `install_quantized_modules(model, checkpoint, sanitize, device, dtype)` on the
     meta-device model swaps in `FP8Linear` (weights stay FP8: `torch._scaled_mm` with per-token FP8 activations on
     GPUs that support it, checked once per device against the dequantized result; elsewhere it dequantizes per call),
     `FP8Experts` / `Int4Experts` (each call dequantizes only the experts the batch routes to, one at a time), puts
     dense weights where no quantized module exists (int4 linears, float expert slices), and returns the sanitized
     names it loaded, which the backend's loop then skips.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.errors import CheckpointError

from .model import Experts

FP8_MAX = 448.0  # largest finite float8_e4m3fn


# -- dequantization ---------------------------------------------------------------------------------------------------
def expand_scale(scale: torch.Tensor, shape, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Broadcast a stored scale onto rows [start:stop] (along dim 0) of a weight of `shape`: per tensor, per output
    channel ([..., R, 1] or [..., R]), per group ([..., R, C/g]) or per 2-D block ([R/b0, C/b1])."""
    shape = tuple(shape)
    stop = shape[0] if stop is None else stop
    s = scale.float()
    if s.numel() == 1:
        return s.reshape([1] * len(shape))
    C = shape[-1]
    if tuple(s.shape) == shape[:-1]:
        return s[start:stop].unsqueeze(-1)
    if s.ndim == len(shape) and tuple(s.shape[:-1]) == shape[:-1]:
        s = s[start:stop]
        return s if s.shape[-1] == 1 else s.repeat_interleave(-(-C // s.shape[-1]), dim=-1)[..., :C]
    if s.ndim == 2 and len(shape) == 2:  # 2-D blocks
        b0, b1 = -(-shape[0] // s.shape[0]), -(-C // s.shape[1])
        return s.repeat_interleave(b0, 0)[start:stop].repeat_interleave(b1, 1)[:, :C]
    raise ValueError(f"cannot broadcast a scale of shape {tuple(scale.shape)} onto a weight of shape {shape}")


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16, shape=None, start: int = 0,
                   stop: int | None = None) -> torch.Tensor:
    """q * scale in float32 (then `dtype`); `weight` may be rows [start:stop] of a tensor of `shape`."""
    shape = tuple(shape or weight.shape)
    return (weight.float() * expand_scale(scale.to(weight.device), shape, start, stop)).to(dtype)


def infer_group(K: int, n_groups: int) -> int:
    """The group size when it was not recorded: K / n when that divides, else the power of two whose ceil fits."""
    if K % n_groups == 0:
        return K // n_groups
    for g in (16, 32, 64, 128, 256, 512, 1024):
        if -(-K // g) == n_groups:
            return g
    raise ValueError(f"no group size splits {K} values into {n_groups} groups")


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16, shape=None,
                    group_size: int | None = None) -> torch.Tensor:
    """(u - 8) * scale in float32 (then `dtype`) from two values per byte (uint8, or the same bytes as int32 words).
    The last group may be shorter than group_size in dgemma's earlier layout (K = 704 with groups of 128)."""
    p = (packed.view(torch.uint8) if packed.dtype == torch.int32 else packed).to(torch.int16)
    q = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*p.shape[:-1], -1).float() - 8.0
    K = q.shape[-1]
    g = group_size or infer_group(K, scale.shape[-1])
    w = q * scale.float().repeat_interleave(g, dim=-1)[..., :K]
    if shape is not None and tuple(int(s) for s in shape) != tuple(w.shape):
        stored = tuple(int(s) for s in shape)
        raise ValueError(f"int4 tensor unpacks to {tuple(w.shape)}, its shape tensor says {stored}")
    return w.to(dtype)


def checkpoint_group_size(checkpoint) -> int | None:
    """The int4 group size config.json records (compressed-tensors' config_groups, or dgemma's earlier
    dgemma_layout), if any."""
    qc = checkpoint.raw_config.get("quantization_config") or {}
    for group in (qc.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        if weights.get("num_bits") == 4 and weights.get("group_size"):
            return int(weights["group_size"])
    return (qc.get("dgemma_layout") or {}).get("group_size")


def load_quantized_tensor(name: str, tensors: Mapping[str, torch.Tensor], dtype=torch.bfloat16,
                          group_size: int | None = None) -> torch.Tensor:
    """The dense tensor for logical (Hugging Face) name `name` of one (not per-expert) entry, given its stored parts
    by stored name."""
    if name + "_packed" in tensors:  # int4: compressed-tensors' P.weight_packed or dgemma's earlier X_packed
        return dequantize_int4(tensors[name + "_packed"], tensors[name + "_scale"], dtype, tensors.get(name + "_shape"),
                               group_size)
    w = tensors[name]
    if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        if name + "_scale" not in tensors:
            raise KeyError(f"{name} is FP8 but {name}_scale is missing")
        return dequantize_fp8(w, tensors[name + "_scale"], dtype)
    return w.to(dtype) if w.is_floating_point() else w


# -- which stored tensors make up each logical tensor -----------------------------------------------------------------
EXPERT_SLICE = re.compile(r"^(?P<base>.+\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")
NOT_WEIGHTS = ("input_scale", "weight_zero_point", "input_zero_point", "input_global_scale")


@dataclass
class QuantizedEntry:
    name: str            # logical (Hugging Face) name
    kind: str            # plain | fp8 | int4 | experts
    parts: list[str]     # stored names
    tiles: list["QuantizedEntry"] = field(default_factory=list)  # experts: the per-expert linears, in row order

    @property
    def kinds(self) -> set[str]:
        return {t.kind for t in self.tiles} if self.tiles else {self.kind}


def _group_experts(entries: dict[str, QuantizedEntry], checkpoint) -> dict[str, QuantizedEntry]:
    """Gather per-expert linears (`...experts.E.gate_proj.weight`, ...) into the packed logical tensors."""
    found: dict[tuple[str, str], dict[tuple[int, str], QuantizedEntry]] = {}
    for name in list(entries):
        m = EXPERT_SLICE.match(name)
        if m:
            which = "down_proj" if m["proj"] == "down" else "gate_up_proj"
            found.setdefault((m["base"], which), {})[(int(m["e"]), m["proj"])] = entries.pop(name)
    for (base, which), slices in found.items():
        projs = ("down",) if which == "down_proj" else ("gate", "up")
        order = [(e, p) for e in range(1 + max(e for e, _ in slices)) for p in projs]
        missing = [k for k in order if k not in slices]
        if missing:
            raise CheckpointError(f"{checkpoint.path}: {base}: expert {missing[0][0]} has no {missing[0][1]}_proj")
        tiles = [slices[k] for k in order]
        entries[f"{base}.{which}"] = QuantizedEntry(f"{base}.{which}", "experts",
                                                    [p for t in tiles for p in t.parts], tiles)
    return entries


def _group(checkpoint) -> dict[str, QuantizedEntry]:
    st = checkpoint.tensors
    out: dict[str, QuantizedEntry] = {}
    used: set[str] = set()
    for n in st:
        if n.endswith("_packed") and n[:-7] + "_scale" in st:  # int4: P.weight_packed or dgemma's earlier X_packed
            base = n[:-7]
            parts = [n, base + "_scale"] + ([base + "_shape"] if base + "_shape" in st else [])
            out[base] = QuantizedEntry(base, "int4", parts)
            used |= set(parts)
    for n, info in st.items():
        if n not in used and info.dtype.startswith("F8"):
            out[n] = QuantizedEntry(n, "fp8", [n, n + "_scale"])
            used |= {n, n + "_scale"}
    for n in st:
        if n not in used and not n.endswith(NOT_WEIGHTS):
            out[n] = QuantizedEntry(n, "plain", [n])
    return _group_experts(out, checkpoint)


def quantization_kind(checkpoint) -> str | None:
    """'int4' / 'fp8' when the checkpoint stores such tensors (int4 wins when both), else None."""
    kinds = set().union(*(e.kinds for e in _group(checkpoint).values()))
    return "int4" if "int4" in kinds else ("fp8" if "fp8" in kinds else None)


def logical_names(checkpoint) -> list[str]:
    return list(_group(checkpoint))


class _Reader:
    """Stored tensors by name, one safe_open handle per shard."""

    def __init__(self, checkpoint, device=None):
        self.checkpoint, self.device, self.handles = checkpoint, device, {}

    def __call__(self, part: str) -> torch.Tensor:
        from safetensors import safe_open

        if part not in self.checkpoint.tensors:
            raise CheckpointError(f"{self.checkpoint.path}: a quantized tensor's part {part} is missing")
        f = self.checkpoint.tensors[part].file
        if f not in self.handles:
            self.handles[f] = safe_open(str(f), framework="pt", device="cpu")
        t = self.handles[f].get_tensor(part)
        return t if self.device is None else t.to(self.device)


def _dense(e: QuantizedEntry, read, dtype, group_size) -> torch.Tensor:
    """One logical tensor, dense: per-expert slices stacked back into [E, rows, K]."""
    if e.kind == "experts":
        tiles = [_dense(t, read, dtype, group_size) for t in e.tiles]
        E = len(tiles) // (1 if e.name.endswith("down_proj") else 2)
        return torch.cat(tiles).reshape(E, -1, tiles[0].shape[-1])
    if e.kind == "plain":
        return read(e.name)
    return load_quantized_tensor(e.name, {p: read(p) for p in e.parts}, dtype, group_size)


def iter_dense_tensors(checkpoint, names=None, dtype=None, device=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Like `Checkpoint.iter_tensors("pt", names)` but under logical names, quantized tensors dequantized (to `dtype`,
    default bfloat16; plain tensors keep their dtype unless `dtype` is given). One tensor in memory at a time."""
    read = _Reader(checkpoint)
    group = checkpoint_group_size(checkpoint)
    for name, e in _group(checkpoint).items():
        if names is not None and name not in names:
            continue
        t = _dense(e, read, dtype or torch.bfloat16, group)
        if e.kinds == {"plain"}:
            t = t.to(dtype) if (dtype is not None and t.is_floating_point()) else t
        yield name, (t.to(device) if device is not None else t)


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


def _put(model: nn.Module, ours: str, tensor: torch.Tensor, device, dtype) -> None:
    """A dense weight where the model has no quantized module for it (the model may still be on the meta device)."""
    parent_path, _, attr = ours.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._parameters[attr] = nn.Parameter(tensor.to(device, dtype), requires_grad=False)


def _fp8_experts(e: QuantizedEntry, read) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 [E, rows, K], float32 scales [E, rows, 1]) of one packed expert tensor, from per-expert slices or the
    earlier 3-D layout."""
    if e.kind == "fp8":
        return read(e.name), read(e.name + "_scale").float()
    E = len(e.tiles) // (1 if e.name.endswith("down_proj") else 2)
    q = torch.cat([read(t.name).view(torch.uint8) for t in e.tiles]).view(torch.float8_e4m3fn)
    scale = torch.cat([read(t.name + "_scale").float().reshape(-1, 1) for t in e.tiles])
    return q.reshape(E, -1, q.shape[-1]), scale.reshape(E, -1, 1)


def _int4_experts(e: QuantizedEntry, read) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [E, rows, K/2], scales [E, rows, groups]) of one packed expert tensor."""
    if not e.tiles:
        return read(e.name + "_packed"), read(e.name + "_scale")
    E = len(e.tiles) // (1 if e.name.endswith("down_proj") else 2)
    packed = torch.cat([read(t.parts[0]).view(torch.uint8) for t in e.tiles])
    scale = torch.cat([read(t.parts[1]) for t in e.tiles])
    return packed.reshape(E, -1, packed.shape[-1]), scale.reshape(E, -1, scale.shape[-1])


def install_quantized_modules(model: nn.Module, checkpoint, sanitize, device, dtype=torch.bfloat16) -> set[str]:
    """Swap FP8Linear / Int4Experts / FP8Experts into `model` for every quantized tensor of `checkpoint` and load
    them (dense where no quantized module exists: int4 linears, float per-expert slices); returns the sanitized
    parameter names now loaded (the caller skips them and counts them as present)."""
    entries = {n: e for n, e in _group(checkpoint).items()
               if (e.kind != "plain") and sanitize(n) is not None}
    read = _Reader(checkpoint, device)
    group = checkpoint_group_size(checkpoint)
    loaded: set[str] = set()
    experts: dict[str, dict[str, QuantizedEntry]] = {}
    for name, e in entries.items():
        ours = sanitize(name)
        if ours.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            mod, _, param = ours.rpartition(".")
            experts.setdefault(mod, {})[param] = e
        elif e.kind == "fp8" and ours.endswith(".weight"):
            parent_path, _, attr = ours[: -len(".weight")].rpartition(".")
            setattr(model.get_submodule(parent_path), attr, FP8Linear(read(name), read(name + "_scale"), dtype))
        else:
            _put(model, ours, _dense(e, read, dtype, group), device, dtype)
        loaded.add(ours)
    for mod, parts in experts.items():
        if set(parts) != {"gate_up_proj", "down_proj"}:
            raise CheckpointError(f"{checkpoint.path}: {mod}: gate_up_proj and down_proj must both be stored")
        kinds = parts["gate_up_proj"].kinds | parts["down_proj"].kinds
        parent_path, _, attr = mod.rpartition(".")
        if kinds == {"fp8"}:
            new = FP8Experts(_fp8_experts(parts["gate_up_proj"], read), _fp8_experts(parts["down_proj"], read))
        elif kinds == {"int4"}:
            new = Int4Experts(_int4_experts(parts["gate_up_proj"], read), _int4_experts(parts["down_proj"], read),
                              group)
        else:  # float slices, or a mix: dense experts
            for param, e in parts.items():
                _put(model, f"{mod}.{param}", _dense(e, read, dtype, group), device, dtype)
            continue
        setattr(model.get_submodule(parent_path), attr, new)
    read.handles.clear()
    return loaded
