"""Quantization kernels (PyTorch, CPU): MLX affine, FP8 e4m3 per output channel, symmetric group-wise int4.

Every function works on the last axis of a float32 chunk of rows, so the converter can stream a tensor through them a
few rows (or experts) at a time. FP8 and int4 are dequantized by the PyTorch backend's loader
(`dgemma.backends.cuda.quantized`: `q * scale`, `(u - 8) * scale`), the one copy of that math; MLX's affine format
(`scales * q + biases`) only here, the MLX backend reading it with mx.dequantize.
"""

from __future__ import annotations

import torch

from dgemma.backends.cuda.quantized import FP8_MAX

INT4_LEVELS = 7.5  # compressed-tensors' symmetric int4 convention: scale = absmax / 7.5, q in [-8, 7]


# -- MLX affine (mlx-lm layout) ------------------------------------------------------------------------------------
def _own_float(w: torch.Tensor, overwrite: bool) -> torch.Tensor:
    """`w` as a float32 tensor the caller may modify in place (a copy unless `overwrite` allows reusing `w`)."""
    g = w.float()
    if g is w or g.data_ptr() == w.data_ptr():
        g = g.contiguous() if overwrite else g.clone(memory_format=torch.contiguous_format)
    return g.contiguous()


def _pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K] of values < 16 -> uint8 [..., K/2], element 2j in the low nibble of byte j and 2j+1 in the high
    one. Each little-endian pair read as int16 is lo | hi << 8; OR-ing in itself shifted right by 4 puts hi << 4 in
    the low byte, which the narrowing cast keeps."""
    v = u.view(torch.int16)
    v = v | (v >> 4)
    return v.to(torch.uint8)


def mlx_quantize(w: torch.Tensor, bits: int, group_size: int, out_dtype: torch.dtype, overwrite: bool = False):
    """Bit-for-bit what `mx.quantize(w, group_size, bits)` (affine mode, CPU kernel) returns for `w` of dtype
    `out_dtype`: packed uint32 [..., K * bits / 32] (as int32 bits), scales and biases [..., K / group_size] in
    `out_dtype`. `w` must already hold values representable in `out_dtype` (the caller casts first). `overwrite`:
    `w` may be used as scratch space when it is already float32 (the converter's chunks are)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    *lead, K = w.shape
    if K % group_size:
        raise ValueError(f"last dim {K} is not a multiple of group_size {group_size}")
    g = _own_float(w, overwrite).reshape(*lead, K // group_size, group_size)
    n_bins = float((1 << bits) - 1)
    w_max = g.amax(-1, keepdim=True)
    w_min = g.amin(-1, keepdim=True)
    mask = w_min.abs() > w_max.abs()
    scale = torch.clamp((w_max - w_min) / n_bins, min=1e-7)
    scale = torch.where(mask, scale, -scale)
    edge = torch.where(mask, w_min, w_max)
    q0 = torch.round(edge / scale)  # rint: half to even, as std::rint
    nz = q0 != 0
    scale = torch.where(nz, edge / torch.where(nz, q0, torch.ones_like(q0)), scale)
    bias = torch.where(nz, edge, torch.zeros_like(edge))
    # q = clamp(rint((w - bias) / scale), 0, n_bins), the same float32 operations, in place on the chunk
    g.sub_(bias).div_(scale).round_().clamp_(0, n_bins)
    q = g.to(torch.uint8).reshape(*lead, K)
    del g
    # 32 / bits values per little-endian uint32 word, the first in the lowest bits: for 8 bits the bytes themselves,
    # for 4 bits two nibbles per byte; read back as int32 (the same 32 bits as uint32)
    packed = (q if bits == 8 else _pack_nibbles(q)).view(torch.int32)
    return packed, scale.squeeze(-1).to(out_dtype), bias.squeeze(-1).to(out_dtype)


def mlx_dequantize(packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int):
    """float32 [..., K] from the mlx-lm layout (packed as uint32 or int32 bits)."""
    p = packed.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    q = ((p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(*p.shape[:-1], -1).float()
    K = q.shape[-1]
    q = q.reshape(*q.shape[:-1], K // group_size, group_size)
    w = scales.float().unsqueeze(-1) * q + biases.float().unsqueeze(-1)
    return w.reshape(*q.shape[:-2], K)


# -- FP8 e4m3, one float32 scale per output channel (row) ------------------------------------------------------------
def fp8_quantize(w: torch.Tensor, overwrite: bool = False):
    """(float8_e4m3fn weights, float32 scales [..., 1]) with scale = absmax(row) / 448."""
    w = _own_float(w, overwrite)
    absmax = torch.maximum(w.amax(-1, keepdim=True), w.amin(-1, keepdim=True).neg_())  # == amax(|w|), one pass less
    scale = (absmax / FP8_MAX).clamp(min=1e-12)
    q = w.div_(scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


# -- int4, symmetric, group-wise along the last axis, two per uint8 -------------------------------------------------
def int4_quantize(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.bfloat16, overwrite: bool = False):
    """(packed uint8 [..., K/2], scales [..., ceil(K/group_size)] in scale_dtype). Byte j holds element 2j in its low
    nibble and 2j+1 in its high nibble, each stored as q + 8 with q = clamp(round(w / scale), -8, 7), scale =
    absmax / 7.5 rounded to scale_dtype before use (so dequantization with the stored scale is exact). K need not be a
    multiple of group_size (the experts' down_proj has K = 704): the last group is shorter."""
    *lead, K = w.shape
    if K % 2:
        raise ValueError(f"last dim {K} is odd: int4 packs two values per byte")
    n = -(-K // group_size)
    if n * group_size != K:  # zero padding: changes no group's absmax, sliced off before packing
        wf = torch.zeros(*lead, n * group_size, dtype=torch.float32)
        wf[..., :K].copy_(w)
    else:
        wf = _own_float(w, overwrite)
    g = wf.reshape(*lead, n, group_size)
    absmax = torch.maximum(g.amax(-1, keepdim=True), g.amin(-1, keepdim=True).neg_())  # == amax(|w|)
    scale = (absmax / INT4_LEVELS).clamp(min=1e-8).to(scale_dtype)
    g.div_(scale.float()).round_().clamp_(-8, 7).add_(8)  # q + 8, exact small integers in float32
    u = wf[..., :K].to(torch.uint8).contiguous()
    del g, wf
    return _pack_nibbles(u), scale.squeeze(-1)
