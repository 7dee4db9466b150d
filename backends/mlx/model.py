"""DiffusionGemma's text backbone in MLX: one file, the encoder and decoder passes over shared weights (mlx-lm style).

Module names follow the checkpoint's decoder (`sanitize()` maps the Hugging Face names, mlx-vlm's MLX conversions and
our own names onto them). Numerics follow transformers' reference op for op where it matters for parity: RMSNorm in
float32 via pow(-0.5) with the weight multiplied in float32 before the cast back (`mx.fast.rms_norm` casts before the
weight multiply, which moves about a quarter of bf16 outputs by one ulp, so it is used for float32 only), float32 router
softmax, RoPE tables computed in float32 and cast to the activations' dtype, float32 soft-capped logits.

Experts are switch layers in mlx-lm's layout (`weight` [E, out, in]; `weight`/`scales`/`biases` once quantized): one fused
gate_up [E, 2I, H] and one down [E, H, I], as the checkpoint packs them. Tokens are sorted by expert and run through
`mx.gather_mm`, or `mx.gather_qmm` once quantized, never a Python loop over experts. They are defined here rather than
imported from `mlx_lm.models.switch_layers` because importing anything from mlx_lm runs its package __init__, which
imports transformers (~7 s before the first token); the layout and the kernels are the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from dgemma.config import LayerSpec, ModelConfig
from dgemma.kvlayout import RowLayout, decode_layout, extend_layout, span_bucket, width_bucket
from dgemma.passes import CachePasses

NORM_NAMES = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
              "post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2")
_ROOTS = ("layers.", "embed_tokens.", "norm.", "self_conditioning.")
# Prefixes under which the text decoder's weights appear: transformers (`model.decoder.`), mlx-vlm's conversions
# (the same), an mlx-lm style `language_model.model.` and our own bare names.
_PREFIXES = ("model.decoder.", "language_model.model.decoder.", "language_model.model.", "model.language_model.",
             "language_model.", "model.")
_ENCODER_SCALAR = re.compile(r"(?:.*\.)?encoder\.language_model\.layers\.(\d+)\.layer_scalar")


def sanitize_name(name: str) -> str | None:
    """Map one tensor name (HF, mlx-vlm, mlx-lm style or ours) onto this module's names; None for tensors not used
    (the vision tower, the tied LM head, the encoder's tied copies of decoder weights)."""
    m = _ENCODER_SCALAR.fullmatch(name)
    if m:  # a buffer in the reference, so the encoder keeps its own copy
        return f"layers.{m.group(1)}.encoder_layer_scalar"
    if "vision" in name or "rotary_emb" in name or name.endswith("lm_head.weight") or ".encoder." in f".{name}":
        return None
    for p in _PREFIXES:
        if name.startswith(p) and name[len(p):].startswith(_ROOTS):
            name = name[len(p):]
            break
    if not name.startswith(_ROOTS):
        return None
    # HF stores the packed experts as bare parameters; here they are SwitchLinear weights.
    if re.fullmatch(r"layers\.\d+\.experts\.(gate_up_proj|down_proj)", name):
        return name + ".weight"
    return name


def sanitize(weights: dict) -> dict:
    """Rename a whole weight dict (mlx-lm's `Model.sanitize` contract); also fuses experts stored as separate
    gate/up projections (`experts.gate_proj` + `experts.up_proj`, with or without `switch_glu.`) into gate_up."""
    out = {}
    for k, v in weights.items():
        n = sanitize_name(k)
        if n is not None:
            out[n.replace(".experts.switch_glu.", ".experts.")] = v
    for k in [k for k in out if re.fullmatch(r"layers\.\d+\.experts\.gate_proj\.\w+", k)]:
        up = k.replace(".gate_proj.", ".up_proj.")
        if up in out:
            out[k.replace(".gate_proj.", ".gate_up_proj.")] = mx.concatenate([out.pop(k), out.pop(up)], axis=1)
    return out


# -- numerics ----------------------------------------------------------------------------------------------------
# Not shapeless: a shapeless trace would bake the mean's divisor of the first shape it saw into every later call.
@mx.compile
def _rms_norm_ref(x, weight, eps):
    h = x.astype(mx.float32)
    h = h * mx.power(mx.mean(h * h, axis=-1, keepdims=True) + eps, -0.5)
    return (h * weight.astype(mx.float32)).astype(x.dtype)


@mx.compile
def _rms_norm_ref_noscale(x, eps):
    h = x.astype(mx.float32)
    return (h * mx.power(mx.mean(h * h, axis=-1, keepdims=True) + eps, -0.5)).astype(x.dtype)


def rms_norm(x, weight, eps: float):
    if x.dtype == mx.float32:  # mx.fast.rms_norm matches the reference to ~1e-7 in float32
        return mx.fast.rms_norm(x, weight, eps)
    e = mx.array(eps, dtype=mx.float32)
    return _rms_norm_ref(x, weight, e) if weight is not None else _rms_norm_ref_noscale(x, e)


@partial(mx.compile, shapeless=True)
def geglu(gate, up):
    return nn.gelu_approx(gate) * up  # gelu with tanh, as gelu_pytorch_tanh


@mx.compile  # slicing needs shapes: traced once per (tokens, heads) shape
def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


@partial(mx.compile, shapeless=True)
def _softcap(x, cap):
    x = x.astype(mx.float32)
    return mx.tanh(x / cap) * cap


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dim,))

    def __call__(self, x):
        return rms_norm(x, self.weight, self.eps)


# -- layers ------------------------------------------------------------------------------------------------------
def _attention_reduced_cpu(q, k, v, mask):
    """bf16/fp16 attention on the CPU as PyTorch's CPU flash kernel (which the reference runs) computes it: scores,
    softmax max and row sums in float32, the exponentials rounded to the activations' dtype for the product with v,
    float32 accumulation, one rounding of the output. (MLX's CPU fallback rounds the scores themselves, which moves
    the attention by several ulps and flips expert choices downstream; on Metal the fused kernel is used.)"""
    rep = q.shape[1] // k.shape[1]
    kf, vf = k.astype(mx.float32), v.astype(mx.float32)
    if rep > 1:
        kf, vf = mx.repeat(kf, rep, axis=1), mx.repeat(vf, rep, axis=1)
    s = q.astype(mx.float32) @ kf.swapaxes(-1, -2)
    if mask is not None:
        s = mx.where(mask, s, -mx.inf)
    p = mx.exp(s - s.max(axis=-1, keepdims=True))
    denom = p.sum(axis=-1, keepdims=True)
    out = (p.astype(q.dtype).astype(mx.float32) @ vf) / denom
    return out.astype(q.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        h, d, nq, nkv = cfg.hidden_size, spec.head_dim, cfg.num_attention_heads, spec.num_kv_heads
        self.head_dim, self.n_heads, self.n_kv = d, nq, nkv
        self.q_proj = nn.Linear(h, nq * d, bias=False)
        self.k_proj = nn.Linear(h, nkv * d, bias=False)
        if spec.sliding:  # full-attention layers have no v_proj: values are the k projection before norm and RoPE
            self.v_proj = nn.Linear(h, nkv * d, bias=False)
        self.o_proj = nn.Linear(nq * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.eps = cfg.rms_norm_eps

    def project(self, x, cos, sin):
        """q [B, Hq, T, D], k and v [B, Hkv, T, D]."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim)).transpose(0, 2, 1, 3)
        k_raw = self.k_proj(x).reshape(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.n_kv, self.head_dim) if "v_proj" in self else k_raw
        k = self.k_norm(k_raw).transpose(0, 2, 1, 3)
        v = rms_norm(v, None, self.eps).transpose(0, 2, 1, 3)
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def attend(self, q, k, v, mask):
        B, _, T, _ = q.shape
        if q.dtype != mx.float32 and mx.default_device() == mx.cpu:
            out = _attention_reduced_cpu(q, k, v, mask)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = mx.ones((cfg.hidden_size,))
        self.per_expert_scale = mx.ones((cfg.num_experts,))
        self.root = cfg.hidden_size**-0.5
        self.eps = cfg.rms_norm_eps
        self.top_k = cfg.top_k_experts

    def __call__(self, x):
        h = rms_norm(x, None, self.eps) * self.scale * self.root
        probs = mx.softmax(self.proj(h).astype(mx.float32), axis=-1)
        # The choice is discrete: no gradient flows through the indices (training differentiates the layer; MLX
        # refuses to differentiate a gather by its indices unless they are cut off from the graph).
        idx = mx.stop_gradient(mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[..., : self.top_k])
        w = mx.take_along_axis(probs, idx, axis=-1)
        w = w / w.sum(axis=-1, keepdims=True)
        return w * self.per_expert_scale[idx], idx


def _gather_sort(x, indices):
    k = indices.shape[-1]
    flat = indices.flatten()
    order = mx.argsort(flat)
    return x.flatten(0, -3)[order // k], flat[order], mx.argsort(order)


class SwitchLinear(nn.Module):
    """E linear maps [E, out, in] applied per token by expert index (mlx-lm's SwitchLinear layout)."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, output_dims, input_dims))

    def __call__(self, x, indices, sorted_indices=False):
        w = self.weight.swapaxes(-1, -2)
        if x.dtype != mx.float32 and mx.default_device() == mx.cpu:
            # MLX's CPU GatherMM is float32-only: run it in float32 (bf16 products are exact there) and round once.
            return mx.gather_mm(x.astype(mx.float32), w.astype(mx.float32), rhs_indices=indices,
                                sorted_indices=sorted_indices).astype(x.dtype)
        return mx.gather_mm(x, w, rhs_indices=indices, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        E, out_dims, in_dims = self.weight.shape
        q = QuantizedSwitchLinear(in_dims, out_dims, E, group_size, bits, mode)
        q.weight, q.scales, *b = mx.quantize(self.weight, group_size, bits, mode=mode)
        q.biases = b[0] if b else None
        return q


class QuantizedSwitchLinear(nn.Module):
    """The quantized switch layer: packed uint32 `weight`, `scales`, `biases`, run by `mx.gather_qmm`."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, group_size: int = 64, bits: int = 4,
                 mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, *b = mx.quantize(mx.zeros((num_experts, output_dims, input_dims)), group_size,
                                                    bits, mode=mode)
        self.biases = b[0] if b else None
        self.freeze()

    def __call__(self, x, indices, sorted_indices=False):
        return mx.gather_qmm(x, self["weight"], self["scales"], self.get("biases"), rhs_indices=indices,
                             transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode,
                             sorted_indices=sorted_indices)


class Experts(nn.Module):
    """Packed experts: gate_up [E, 2I, H] (gate rows first), down [E, H, I]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.inner = I
        self.gate_up_proj = SwitchLinear(H, 2 * I, E)
        self.down_proj = SwitchLinear(I, H, E)

    def __call__(self, x, weights, idx):
        """x [N, H], weights/idx [N, k] -> [N, H]."""
        dtype = x.dtype
        x = mx.expand_dims(x, (-2, -3))  # [N, 1, 1, H]
        do_sort = idx.size >= 64
        inds, inv = idx, None
        if do_sort:  # tokens grouped by expert: each expert's rows are contiguous for the gathered matmul
            x, inds, inv = _gather_sort(x, idx)
        h = self.gate_up_proj(x, inds, sorted_indices=do_sort)
        y = self.down_proj(geglu(h[..., : self.inner], h[..., self.inner:]), inds, sorted_indices=do_sort)
        if do_sort:
            y = mx.unflatten(y[inv], 0, idx.shape)
        y = y.squeeze(-2)  # [N, k, H]
        # As the reference: each expert's output times its float32 weight, rounded to the activations' dtype, summed.
        return (y * weights[..., None]).astype(dtype).sum(axis=-2)


class DenseMLP(nn.Module):
    def __init__(self, h: int, i: int):
        super().__init__()
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def __call__(self, x):
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.sliding = spec.sliding
        self.self_attn = Attention(cfg, spec)
        self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        for name in NORM_NAMES:
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
        self.layer_scalar = mx.ones((1,))
        self.encoder_layer_scalar = mx.ones((1,))  # the encoder's own copy (a separate buffer in the reference)

    def feed_forward(self, x, scalar):
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        flat = x.reshape(-1, x.shape[-1])
        w, idx = self.router(flat)  # routes on the raw residual
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), w, idx).reshape(x.shape)
        moe = self.post_feedforward_layernorm_2(moe)
        return (x + self.post_feedforward_layernorm(dense + moe)) * scalar


class SelfConditioning(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, soft):
        s = self.pre_norm(soft)
        return self.down_proj(geglu(self.gate_proj(s), self.up_proj(s)))


@dataclass
class KVState:
    """Per-layer keys/values [B, Hkv, L, D] the decoder reads: sliding layers keep the last window-1 positions (as the
    reference's cache does), full layers keep everything. `valid` ([B, length], host numpy) marks real positions."""

    keys: list
    values: list
    valid: np.ndarray
    length: int
    has_padding: bool

    def key_mask(self, layer_len: int) -> np.ndarray:
        return self.valid[:, self.length - layer_len:]


class DiffusionGemmaText(CachePasses, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [Layer(cfg, spec) for spec in cfg.layers]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg)
        self._inv_freq = {k: mx.array(v) for k, v in cfg.rope_inv_freqs().items()}  # not a parameter (leading _)
        self._softcap = None if cfg.final_logit_softcapping is None else mx.array(cfg.final_logit_softcapping,
                                                                                  dtype=mx.float32)

    # -- pieces ----------------------------------------------------------------------------------------------------
    @property
    def dtype(self):
        e = self.embed_tokens
        return e.scales.dtype if isinstance(e, nn.QuantizedEmbedding) else e.weight.dtype

    def embed(self, ids):
        return self.embed_tokens(ids) * mx.array(self.cfg.embed_scale, dtype=mx.float32).astype(self.dtype)

    def soft_embed(self, probs):
        """softmax(previous logits) @ embedding, in the embedding's dtype (a quantized matmul when it is quantized)."""
        e = self.embed_tokens
        p = probs.astype(self.dtype)
        if isinstance(e, nn.QuantizedEmbedding):
            return mx.quantized_matmul(p, e.weight, e.scales, e.get("biases"), transpose=False,
                                       group_size=e.group_size, bits=e.bits, mode=getattr(e, "mode", "affine"))
        return p @ e.weight

    def rope(self, positions, dtype):
        """cos/sin tables for positions [T] (shared by the batch: [T, D]) or [B, T] (one row each: [B, 1, T, D]);
        host ints or a float32 mx.array (inside a compiled pass)."""
        pos = positions if isinstance(positions, mx.array) else mx.array(np.asarray(positions, dtype=np.float32))
        out = {}
        for key, inv in self._inv_freq.items():
            f = pos[..., None] * inv
            emb = mx.concatenate([f, f], axis=-1)
            if emb.ndim == 3:
                emb = emb[:, None]
            out[key] = (mx.cos(emb).astype(dtype), mx.sin(emb).astype(dtype))
        return out

    def logits(self, h):
        x = self.embed_tokens.as_linear(h)
        if self._softcap is None:
            return x.astype(mx.float32)
        return _softcap(x, self._softcap)

    def soft_embedding(self, probs):
        """softmax(previous processed logits) @ embedding * sqrt(hidden): the self-conditioning input, [B, C, H]."""
        return self.soft_embed(probs) * mx.array(self.cfg.embed_scale, dtype=mx.float32).astype(self.dtype)

    def decoder_input(self, canvas, soft):
        x = self.embed(canvas)
        if soft is not None:
            x = x + self.self_conditioning(soft)
        # With no previous logits the signal is exactly zero (MLP of a zero vector), so it is skipped.
        return rms_norm(x, None, self.cfg.rms_norm_eps)

    # -- inference over the backend's batch cache: dgemma.passes.CachePasses (run_layers, extend), decode_rows here
    def as_activations(self, x):
        return (x if isinstance(x, mx.array) else mx.array(np.asarray(x))).astype(self.dtype)

    def decode_rows(self, cache, rows: slice, canvas, soft=None, positions: np.ndarray | None = None):
        """The decoder pass of dgemma.passes.CachePasses.decode_rows (same contract), as one compiled graph per shape
        bucket. What varies from pass to pass enters as arrays (write slots, RoPE positions, masks), and the shapes
        are bucketed: the keys read grow to `span_bucket` sizes (the extra slots masked out), a fast pass's forwarded
        width to `width_bucket` sizes (padded with copies of its last position). A canvas reuses its first pass's
        trace, a later canvas reuses it until the cache crosses a bucket, so traces grow with log(length)."""
        C = self.cfg.canvas_length if positions is not None else canvas.shape[1]
        lay = decode_layout(cache.layout, rows, C)
        k, A = canvas.shape
        pos = np.broadcast_to(np.arange(C), (k, C)) if positions is None else np.asarray(positions)
        width = A if positions is None else width_bucket(A, C)
        pad = None
        if width > A:  # the padding repeats the last position, and each copy writes that position's own keys and
            # values (`pad` indexes them), so the cache ends as the unpadded pass leaves it
            pad = np.minimum(np.arange(width), A - 1)
            canvas, pos = canvas[:, mx.array(pad)], pos[:, pad]
            soft = None if soft is None else soft[:, mx.array(pad)]
        full_read = span_bucket(lay.full_span)
        cache.reserve(full_read - (lay.full_span - C), rows)  # the bucketed read stays inside the buffer
        sliding_read = lay.sliding_span  # one size once every row keeps window - 1 slots (no mask then)
        if (lay.sliding_write < self.cfg.sliding_window - 1).any():  # a short cache: bucketed too
            sliding_read = min(span_bucket(sliding_read), self.cfg.sliding_window - 1 + cache.pass_width)
        write = {True: lay.sliding_write, False: lay.full_write}
        masks = {True: _read_mask(lay.sliding_mask, lay.sliding_span, sliding_read, k),
                 False: _read_mask(lay.full_mask, lay.full_span, full_read, k)}
        slots = {s: write[s][:, None] + pos for s in (True, False)}  # [k, width] per layer kind; RoPE: the full ones
        start, stop, _ = rows.indices(cache.rows)
        hidden, cache.key_buffers, cache.value_buffers = self._compiled_decode()(
            canvas, soft, mx.array(slots[False].astype(np.float32)), mx.array(slots[True].astype(np.int32)),
            mx.array(slots[False].astype(np.int32)), masks[True], masks[False],
            None if pad is None else mx.array(pad.astype(np.int32)), cache.key_buffers, cache.value_buffers,
            start, stop, sliding_read, full_read)
        return hidden if pad is None else hidden[:, :A]

    def _compiled_decode(self):
        """mx.compile of `_decode_graph`, made on first use; the weights are read at call time (`inputs`), so loading
        or quantizing them later needs no recompile by hand."""
        if getattr(self, "_decode_fn", None) is None:
            self.decoder_traces = 0
            self._decode_fn = mx.compile(self._decode_graph, inputs=self.state)
        return self._decode_fn

    def _decode_graph(self, canvas, soft, positions, sliding_slots, full_slots, sliding_mask, full_mask, pad,
                      key_buffers, value_buffers, start, stop, sliding_read, full_read):
        """The traced body of decode_rows: write each layer's canvas keys/values at its slots ([k, width] per row),
        attend over the first sliding_read / full_read slots of rows [start, stop) of the buffers. Runs once per trace
        (counted in decoder_traces)."""
        self.decoder_traces += 1
        keys, values = list(key_buffers), list(value_buffers)
        row_ids = mx.arange(start, stop)[:, None]
        x = self.decoder_input(canvas, soft)
        tables = self.rope(positions, x.dtype)

        def layer_kv(i, k, v):
            sliding = self.layers[i].sliding
            if pad is not None:
                k, v = k[:, :, pad], v[:, :, pad]
            slots, read = (sliding_slots, sliding_read) if sliding else (full_slots, full_read)
            keys[i][row_ids, :, slots] = k.transpose(0, 2, 1, 3)
            values[i][row_ids, :, slots] = v.transpose(0, 2, 1, 3)
            return (keys[i][start:stop, :, :read], values[i][start:stop, :, :read],
                    sliding_mask if sliding else full_mask)

        x = self.run_layers(x, tables, layer_kv, "layer_scalar", keys_only_last=False)
        return self.norm(x), keys, values

    # -- the functional passes training differentiates through ------------------------------------------------------
    def encode(self, ids, valid: np.ndarray, state: KVState | None = None, *, cache_length: int | None = None,
               return_hidden: bool = False):
        """Causal pass over a fresh batch ids [B, T] (`state` must be None: inference appends through the batch
        cache, `extend`). `cache_length` keeps only the first cache_length positions in the returned state (causal
        attention makes a prefix's cache independent of what follows it); `return_hidden` also runs the last layer
        and returns (state, final-normed hidden states [B, T, H]). Differentiable throughout."""
        if state is not None:
            raise ValueError("encode() starts a new state; append to a cache with extend()")
        B, T = ids.shape
        cached = T if cache_length is None else cache_length
        valid = np.asarray(valid, dtype=bool)
        lay = extend_layout(RowLayout(self.cfg.sliding_window, np.zeros(B, np.int64), np.zeros((B, 0), bool)),
                            slice(0, B), valid)
        masks = {True: mx.array(lay.sliding_mask[:, None]), False: mx.array(lay.full_mask[:, None])}
        x = self.embed(ids)
        tables = self.rope(np.arange(T), x.dtype)
        keys, values = [], []
        W = self.cfg.sliding_window

        def layer_kv(i, k, v):
            sliding = self.layers[i].sliding
            keep = min(cached, W - 1) if sliding else cached
            keys.append(k[:, :, cached - keep:cached] if keep < T else k)
            values.append(v[:, :, cached - keep:cached] if keep < T else v)
            return k, v, masks[sliding]

        x = self.run_layers(x, tables, layer_kv, "encoder_layer_scalar", keys_only_last=not return_hidden)
        kept_valid = valid[:, :cached]
        state = KVState(keys, values, kept_valid, cached, bool((~kept_valid).any()))
        return (state, self.norm(x)) if return_hidden else state

    def decode(self, canvas, state: KVState, sc_probs=None):
        """Decoder over a functional state (training): logits [B, C, V]."""
        B, C = canvas.shape
        x = self.decoder_input(canvas, None if sc_probs is None else self.soft_embedding(sc_probs))
        tables = self.rope(np.arange(state.length, state.length + C), x.dtype)
        masks: dict = {}  # by cache length: the pad mask over [cache ; canvas]

        def layer_kv(i, k, v):
            ck, cv = state.keys[i], state.values[i]
            L = ck.shape[2]
            if state.has_padding and L not in masks:
                kv = np.concatenate([state.key_mask(L), np.ones((B, C), dtype=bool)], axis=1)
                masks[L] = mx.array(kv[:, None, None, :])
            return mx.concatenate([ck, k], axis=2), mx.concatenate([cv, v], axis=2), masks.get(L)

        x = self.run_layers(x, tables, layer_kv, "layer_scalar", keys_only_last=False)
        return self.logits(self.norm(x))


def _read_mask(mask: np.ndarray | None, span: int, read: int, rows: int):
    """The key mask [k, 1, 1, read] of a pass that reads `read` >= `span` slots: the layout's mask (all of the span
    when the rows are uniform), the bucket's extra slots hidden; None when nothing is hidden."""
    if mask is None and read == span:
        return None
    out = np.zeros((rows, read), bool)
    out[:, :span] = True if mask is None else mask
    return mx.array(out[:, None, None])


# -- quantization ----------------------------------------------------------------------------------------------------
def _is_expert(path: str) -> bool:
    return ".experts." in path


def quantize_model(model: DiffusionGemmaText, bits: int = 4, group_size: int = 64, mixed: bool = False,
                   mode: str = "affine") -> dict:
    """Quantize in place with `nn.quantize` (experts become QuantizedSwitchLinear -> mx.gather_qmm).

    mixed=True: experts at `bits` (4 by default), attention, dense MLPs, router, self-conditioning and the embedding
    at 8 bits, as mlx-vlm's predicate does. Modules whose input width is not a multiple of group_size stay in floating
    point. Returns the config.json `quantization` block (defaults plus a per-module entry for every module that
    differs from them, `false` for those left unquantized), keyed by module path as `load_weights` reads it."""
    block: dict = {"group_size": group_size, "bits": bits, "mode": mode}

    def predicate(path, m):
        if not hasattr(m, "to_quantized"):
            return False
        in_dims = m.weight.shape[-1]
        if in_dims % group_size:
            block[path] = False
            return False
        b = bits if (not mixed or _is_expert(path)) else 8
        if b != bits:
            block[path] = {"group_size": group_size, "bits": b, "mode": mode}
        return {"group_size": group_size, "bits": b, "mode": mode}

    nn.quantize(model, class_predicate=predicate)
    return block


def infer_quant_params(path: str, module, weights: dict, default: dict) -> dict:
    """group_size/bits/mode of a saved quantized module from its shapes (what mlx-lm's loader does); `default` supplies
    the mode when the shapes cannot tell."""
    scales = weights[f"{path}.scales"]
    w = weights[f"{path}.weight"]
    in_dims = module.weight.shape[-1]
    if in_dims % scales.shape[-1]:
        raise ValueError(f"{path}: scales of shape {tuple(scales.shape)} do not divide its input width {in_dims}")
    group_size = in_dims // scales.shape[-1]
    bits = (w.shape[-1] * 32) // in_dims
    mode = default.get("mode", "affine")
    if scales.dtype == mx.uint8 and mode == "affine":
        mode = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}.get((bits, group_size), mode)
    return {"group_size": group_size, "bits": bits, "mode": mode}


def normalize_quant_block(block: dict | None) -> dict:
    """Per-module entries of a `quantization` block keyed by our module paths (HF / mlx-vlm / mlx-lm paths mapped)."""
    out = {}
    for k, v in (block or {}).items():
        if k in ("group_size", "bits", "mode") or not isinstance(v, (dict, bool)):
            continue
        n = sanitize_name(k + ".weight")
        if n is not None and n.endswith(".weight"):
            out[n[: -len(".weight")]] = v
    return out


def quantized_paths(model: nn.Module) -> dict[str, dict]:
    """Module path -> its quantization parameters, for every quantized module."""
    out = {}
    for path, m in model.named_modules():
        if hasattr(m, "bits") and hasattr(m, "group_size") and "scales" in m:
            out[path] = {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", "affine")}
    return out

