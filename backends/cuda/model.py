"""DiffusionGemma's text backbone in PyTorch: one file, the encoder and decoder passes over shared weights.

Weight names follow the checkpoint's decoder (`sanitize()` / `sanitize_name()` map the Hugging Face names onto them). Numerics follow
transformers' reference op for op where it matters for parity (float32 RMSNorm via pow(-0.5), float32 router softmax,
float32 RoPE tables cast to the activations' dtype, float32 soft-capped logits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dgemma.config import LayerSpec, ModelConfig
from dgemma.kvlayout import RowLayout, extend_layout
from dgemma.passes import CachePasses
from dgemma.weights import LAYER_NORMS, text_tensor_shapes


def sanitize_name(name: str) -> str | None:
    """Map a Hugging Face checkpoint tensor name onto this module's names; None for tensors we do not use."""
    if name.startswith("model.decoder."):
        return name[len("model.decoder."):]
    m = re.fullmatch(r"model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar", name)
    if m:
        # A buffer, so the reference does not tie it: the encoder keeps its own copy.
        return f"layers.{m.group(1)}.encoder_layer_scalar"
    # Tied copies of decoder weights, the LM head (tied to the embedding) and the vision tower (its own file).
    return None


def sanitize(weights: dict) -> dict:
    """Rename a whole weight dict onto this module's names (mlx-lm's `sanitize` contract, as the MLX backend's)."""
    return {sanitize_name(k): v for k, v in weights.items() if sanitize_name(k) is not None}


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The reference's float32 h * pow(mean(h^2) + eps, -0.5) * w. torch's fused kernel gives it bit for bit on the
    CPU (tests/test_torch_parity.py checks) in one op instead of six; 24 norms run per decoder pass."""
    w = None if weight is None else weight.float()
    return F.rms_norm(x.float(), (x.shape[-1],), w, eps).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def gated_gelu(gate, up):
    return gelu_tanh(gate) * up


def rope_inv_freqs(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return {kind: torch.from_numpy(inv) for kind, inv in cfg.rope_inv_freqs().items()}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        h, d, nq, nkv = cfg.hidden_size, spec.head_dim, cfg.num_attention_heads, spec.num_kv_heads
        self.head_dim, self.n_heads, self.n_kv = d, nq, nkv
        self.sliding = spec.sliding
        self.q_proj = nn.Linear(h, nq * d, bias=False)
        self.k_proj = nn.Linear(h, nkv * d, bias=False)
        # Full-attention layers have no v_proj: values are the k projection before its norm and RoPE.
        self.v_proj = nn.Linear(h, nkv * d, bias=False) if spec.sliding else None
        self.o_proj = nn.Linear(nq * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.eps = cfg.rms_norm_eps

    def project(self, x, cos, sin):
        """q [B, Hq, T, D], k and v [B, Hkv, T, D] for the tokens in x."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim))
        k_raw = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim) if self.v_proj is not None else k_raw
        k = self.k_norm(k_raw)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        v = rms_norm(v, None, self.eps)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, q, k, v, mask):
        B, _, T, _ = q.shape
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))
        self.root = cfg.hidden_size**-0.5
        self.eps = cfg.rms_norm_eps
        self.top_k = cfg.top_k_experts

    def forward(self, x):
        h = rms_norm(x, None, self.eps) * self.scale * self.root
        probs = torch.softmax(self.proj(h), dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, k=self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w * self.per_expert_scale[idx], idx


class Experts(nn.Module):
    """Packed experts: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].

    Tokens are sorted by expert once, so each expert runs one matmul over all of its tokens (grouped work). On CUDA
    with bf16, `torch._grouped_mm` runs all experts in one kernel when it is available (checked at first use).
    """

    dense = True  # quantized subclasses store other tensors and only override `expert()`

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.num_experts = E

    def expert(self, e: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (gate_up [2I, H], down [H, I]) weights in the compute dtype."""
        return self.gate_up_proj[e], self.down_proj[e]

    def forward(self, x, weights, idx):
        N, H = x.shape
        k = idx.shape[1]
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        if self.dense and _grouped_mm_ok(x):
            ys = _grouped_experts(x.index_select(0, order // k), counts, self.gate_up_proj, self.down_proj)
            unsorted = torch.empty_like(ys).index_copy_(0, order, ys)
        elif torch.is_grad_enabled():
            unsorted = self._loop_for_autograd(x, order, k, counts)
        else:
            unsorted = self._loop_in_place(x, order, k, counts)
        # A weighted sum over the k slots, (token, slot) order, in one batched matmul: much faster than index_add_
        # (a scatter) on CPU, and deterministic on GPU.
        out = torch.bmm(weights.to(torch.float32).unsqueeze(1), unsorted.view(N, k, H).float()).squeeze(1)
        return out.to(x.dtype)

    def _expert_mlp(self, e: int, xe):
        gate_up, down = self.expert(e, xe.dtype)
        gate, up = F.linear(xe, gate_up).chunk(2, dim=-1)
        return F.linear(gated_gelu(gate, up), down)

    def _loop_for_autograd(self, x, order, k, counts):
        """Tokens sorted by expert, one matmul per expert on its contiguous slice, split + cat rather than slice
        reads and writes: under autograd every slice's backward fills a zero tensor the size of all of xs, one per
        expert, which cost training on CPU a fifth of its time."""
        xs = x.index_select(0, order // k)
        outs = []
        for e, xe in enumerate(torch.split(xs, counts.tolist())):
            outs.append(xe if xe.shape[0] == 0 else self._expert_mlp(e, xe))  # an unused expert is never touched
        ys = torch.cat(outs)
        return torch.empty_like(ys).index_copy_(0, order, ys)

    def _loop_in_place(self, x, order, k, counts):
        """The same matmuls (bit for bit) without autograd: each expert gathers its own tokens and writes its rows
        straight into (token, slot) order, so no [N * k, H] sorted copy and no concatenation are made (8-15% of the
        experts' time on CPU)."""
        tokens = order // k
        unsorted, start = None, 0
        for e, c in enumerate(counts.tolist()):
            if c:
                rows = slice(start, start + c)
                y = self._expert_mlp(e, x.index_select(0, tokens[rows]))
                if unsorted is None:  # the experts' dtype, which autocast may make other than x's
                    unsorted = y.new_empty(order.shape[0], y.shape[1])
                unsorted.index_copy_(0, order[rows], y)
            start += c
        return x.new_empty(0, x.shape[1]) if unsorted is None else unsorted


_GROUPED_MM_STATE: dict = {}


def _grouped_experts(xs, counts, gate_up, down):
    offs = torch.cumsum(counts, 0).to(torch.int32)
    h = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    return torch._grouped_mm(gelu_tanh(gate) * up, down.transpose(1, 2), offs=offs)


def _grouped_mm_ok(xs) -> bool:
    """Use torch._grouped_mm only on CUDA bf16 and only once it has matched the per-expert loop on this device."""
    if xs.device.type != "cuda" or xs.dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    key = str(xs.device)
    if key not in _GROUPED_MM_STATE:
        try:
            g = torch.Generator(device=xs.device).manual_seed(0)
            E, H, I, n = 4, 64, 32, 40
            x = torch.randn(n, H, device=xs.device, generator=g).bfloat16()
            gu = torch.randn(E, 2 * I, H, device=xs.device, generator=g).bfloat16() / 8
            dn = torch.randn(E, H, I, device=xs.device, generator=g).bfloat16() / 8
            counts = torch.tensor([10, 0, 25, 5], device=xs.device)
            got = _grouped_experts(x, counts, gu, dn).float()
            want, a = [], 0
            for e, c in enumerate(counts.tolist()):
                gate, up = F.linear(x[a:a + c], gu[e]).chunk(2, dim=-1)
                want.append(F.linear(gelu_tanh(gate) * up, dn[e]))
                a += c
            want = torch.cat(want).float()
            _GROUPED_MM_STATE[key] = bool(((got - want).abs().max() <= 0.05 * want.abs().max() + 1e-3).item())
        except Exception:  # missing kernel for this GPU/arch: keep the loop
            _GROUPED_MM_STATE[key] = False
    return _GROUPED_MM_STATE[key]


class DenseMLP(nn.Module):
    def __init__(self, h: int, i: int):
        super().__init__()
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(gated_gelu(self.gate_proj(x), self.up_proj(x)))


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.spec = spec
        self.sliding = spec.sliding
        self.self_attn = Attention(cfg, spec)
        self.mlp = DenseMLP(h, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        for name in LAYER_NORMS:
            setattr(self, name, RMSNorm(h, eps))
        # Buffers in the reference, so the encoder's and the decoder's copies are stored (and may differ).
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("encoder_layer_scalar", torch.ones(1))

    def feed_forward(self, x, scalar):
        residual = x
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(x)))
        flat = residual.reshape(-1, residual.shape[-1])
        w, idx = self.router(flat)  # routes on the raw residual
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), w, idx).reshape(residual.shape)
        moe = self.post_feedforward_layernorm_2(moe)
        return (residual + self.post_feedforward_layernorm(dense + moe)) * scalar


@dataclass
class KVState:
    """Per-layer keys/values the decoder reads: sliding layers keep the last window-1 positions (as the reference's
    cache does), full layers keep everything. `valid` marks real (non-pad) positions over the whole sequence."""

    keys: list
    values: list
    valid: torch.Tensor       # [B, length] bool
    length: int               # positions consumed so far (left pads included, as the reference counts them)
    has_padding: bool

    def key_mask(self, layer_len: int):
        return self.valid[:, self.length - layer_len:]


class DiffusionGemmaText(CachePasses, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.layers = nn.ModuleList(Layer(cfg, spec) for spec in cfg.layers)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.self_conditioning = nn.Module()
        self.self_conditioning.pre_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.self_conditioning.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.self_conditioning.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.self_conditioning.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)
        inv = rope_inv_freqs(cfg)
        self.register_buffer("inv_freq_sliding", inv.get("sliding", torch.zeros(1)), persistent=False)
        self.register_buffer("inv_freq_full", inv.get("full", torch.zeros(1)), persistent=False)

    def reset_rope(self) -> None:
        """Recompute the RoPE frequencies in float32 (after building on the meta device or casting the model)."""
        inv = rope_inv_freqs(self.cfg)
        dev = self.embed_tokens.weight.device
        self.inv_freq_sliding = inv.get("sliding", torch.zeros(1)).to(dev)
        self.inv_freq_full = inv.get("full", torch.zeros(1)).to(dev)

    # -- pieces -----------------------------------------------------------------------------------------------
    def embed(self, ids):
        w = self.embed_tokens.weight
        return F.embedding(ids, w) * torch.tensor(self.cfg.embed_scale, dtype=torch.float32).to(w.dtype)

    def rope(self, positions, dtype):
        """cos/sin tables for positions [T] (shared by the batch) or [B, T] (one row each), host or device ints."""
        p = torch.as_tensor(positions, device=self.embed_tokens.weight.device).float()
        p = p[None, :, None] if p.ndim == 1 else p[:, :, None]
        out = {}
        for key, inv in (("sliding", self.inv_freq_sliding), ("full", self.inv_freq_full)):
            f = p * inv.float()[None, None, :]
            emb = torch.cat((f, f), dim=-1)
            out[key] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return out

    def logits(self, h, inplace: bool = True, workspace=None):
        """Float32 soft-capped logits. In place (three passes over B x C x V floats without allocating) unless
        gradients must flow: autograd needs tanh's output intact. With a `workspace` (sampling.Workspace) the result
        lives in its buffers, which the next call overwrites."""
        w = self.embed_tokens.weight
        if workspace is None:
            x = F.linear(h, w).float()
        else:
            shape = (*h.shape[:-1], w.shape[0])
            x = torch.matmul(h, w.t(), out=workspace.get("logits", shape, h, w.dtype))
            if x.dtype != torch.float32:
                x = workspace.get("logits32", shape, h).copy_(x)
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            x = x.div_(cap).tanh_().mul_(cap) if inplace else torch.tanh(x / cap) * cap
        return x

    def soft_embedding(self, probs: torch.Tensor) -> torch.Tensor:
        """softmax(previous processed logits) @ embedding * sqrt(hidden): the self-conditioning input, [B, C, H]."""
        w = self.embed_tokens.weight
        return torch.matmul(probs.to(w.dtype), w) * torch.tensor(self.cfg.embed_scale, dtype=torch.float32).to(w.dtype)

    def decoder_input(self, canvas: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        x = self.embed(canvas)
        if soft is not None:
            sc = self.self_conditioning
            s = sc.pre_norm(soft)
            x = x + sc.down_proj(gelu_tanh(sc.gate_proj(s)) * sc.up_proj(s))
        # With no previous logits the signal is exactly zero (MLP of a zero vector), so it is skipped.
        return rms_norm(x, None, self.cfg.rms_norm_eps)

    # -- inference over the backend's batch cache: dgemma.passes.CachePasses (run_layers, extend, decode_rows)
    def as_activations(self, x):
        return torch.as_tensor(x).to(self.embed_tokens.weight.device, self.embed_tokens.weight.dtype)

    # -- the functional passes training differentiates through -------------------------------------------------
    def encode(self, ids: torch.Tensor, valid: torch.Tensor, state: KVState | None = None, *,
               cache_length: int | None = None, return_hidden: bool = False):
        """Causal pass over a fresh batch ids [B, T] (`state` must be None: inference appends through the batch
        cache, `extend`). `cache_length` keeps only the first cache_length positions in the returned state (causal
        attention makes a prefix's cache independent of what follows it); `return_hidden` also runs the last layer
        and returns (state, final-normed hidden states [B, T, H])."""
        if state is not None:
            raise ValueError("encode() starts a new state; append to a cache with extend()")
        B, T = ids.shape
        cached = T if cache_length is None else cache_length
        valid_np = valid.detach().cpu().numpy().astype(bool)
        lay = extend_layout(RowLayout(self.cfg.sliding_window, np.zeros(B, np.int64), np.zeros((B, 0), bool)),
                            slice(0, B), valid_np)
        x = self.embed(ids)
        tables = self.rope(torch.arange(T, device=ids.device), x.dtype)
        dev = ids.device
        masks = {s: torch.as_tensor(m, device=dev)[:, None] for s, m in ((True, lay.sliding_mask),
                                                                        (False, lay.full_mask))}
        keys, values = [], []
        W = self.cfg.sliding_window

        def layer_kv(i, k, v):
            sliding = self.layers[i].sliding
            keep = min(cached, W - 1) if sliding else cached
            keys.append(k[:, :, cached - keep:cached].contiguous())
            values.append(v[:, :, cached - keep:cached].contiguous())
            return k, v, masks[sliding]

        x = self.run_layers(x, tables, layer_kv, "encoder_layer_scalar", keys_only_last=not return_hidden)
        kept_valid = valid[:, :cached]
        state = KVState(keys, values, kept_valid, cached, bool((~valid_np[:, :cached]).any()))
        return (state, self.norm(x)) if return_hidden else state

    def decode(self, canvas: torch.Tensor, state: KVState, sc_probs: torch.Tensor | None = None,
               inplace_logits: bool = True) -> torch.Tensor:
        """Decoder over a functional state (training): logits [B, C, V]."""
        B, C = canvas.shape
        dev = canvas.device
        x = self.decoder_input(canvas, None if sc_probs is None else self.soft_embedding(sc_probs))
        tables = self.rope(torch.arange(state.length, state.length + C, device=dev), x.dtype)
        masks: dict = {}  # by cache length: the pad mask over [cache ; canvas]

        def layer_kv(i, k, v):
            ck, cv = state.keys[i], state.values[i]
            L = ck.shape[2]
            if state.has_padding and L not in masks:
                masks[L] = torch.cat([state.key_mask(L), torch.ones(B, C, dtype=torch.bool, device=dev)],
                                     dim=1)[:, None, None, :]
            return torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2), masks.get(L)

        x = self.run_layers(x, tables, layer_kv, "layer_scalar", keys_only_last=False)
        return self.logits(self.norm(x), inplace=inplace_logits)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor this model needs, by its sanitized name, with its shape from the config."""
    return {sanitize_name(name): shape for name, shape in text_tensor_shapes(cfg).items()}
