"""The Gemma 4 vision tower and DiffusionGemma's multimodal embedder in MLX: preprocessed images -> the soft-token
embeddings [n_tokens, text hidden] that replace the image tokens' embeddings in the encoder.

Module names follow the checkpoint's (`sanitize()` drops the `model.encoder.vision_tower.encoder.` prefixes; mlx-vlm's
`vision_tower.` / `embed_vision.` names map the same way). Linears quantized by an MLX conversion (mlx-vlm quantizes
the tower's linears unless told to skip it) load as nn.QuantizedLinear with their bits and group size read off the
shapes; dgemma's own conversions keep the tower unquantized. Numerics
follow transformers' `Gemma4VisionModel`: RMSNorm in float32 via pow(-0.5) (backends/mlx/model.py's rms_norm), axial
RoPE tables in float32 cast to the activations' dtype, attention scale 1.0, pooling, the sqrt(hidden) scale and the
standardisation in float32. Each image runs alone over its real patches (the reference's padding patches are masked
out of attention, so the real patches' outputs are the same).
"""

from __future__ import annotations

import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from dgemma.config import VisionConfig
from dgemma.errors import CheckpointError
from dgemma.vision import PreprocessedImage, TowerCache

from .model import RMSNorm, infer_quant_params, rms_norm

_PREFIXES = (("model.encoder.vision_tower.", ""), ("model.vision_tower.", ""), ("vision_tower.", ""),
             ("model.encoder.embed_vision.", "embedder."), ("model.embed_vision.", "embedder."),
             ("embed_vision.", "embedder."))


def sanitize_name(name: str) -> str | None:
    """Map one checkpoint tensor name onto this module's names; None for tensors that are not the vision tower's."""
    for prefix, ours in _PREFIXES:
        if name.startswith(prefix):
            return ours + re.sub(r"^encoder\.layers\.", "layers.", name[len(prefix):])
    return None


def sanitize(weights: dict) -> dict:
    out = {}
    for k, v in weights.items():
        n = sanitize_name(k)
        if n is not None:
            out[n] = v
    return out


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def axial_rope(x, cos, sin):
    """x [N, heads, D]: the first half of each head rotated by x positions, the second by y positions."""
    half = x.shape[-1] // 2
    c, s = cos[:, None, :], sin[:, None, :]
    return mx.concatenate([_rope(x[..., :half], c[..., :half], s[..., :half]),
                           _rope(x[..., half:], c[..., half:], s[..., half:])], axis=-1)


class ClippableLinear(nn.Module):
    def __init__(self, n_in: int, n_out: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out, bias=False)
        if clipped:
            self.input_min, self.input_max = mx.array(-mx.inf), mx.array(mx.inf)
            self.output_min, self.output_max = mx.array(-mx.inf), mx.array(mx.inf)
        self.clipped = clipped

    def __call__(self, x):
        if self.clipped:
            x = mx.clip(x, self.input_min, self.input_max)
        x = self.linear(x)
        return mx.clip(x, self.output_min, self.output_max) if self.clipped else x


def _activation(name: str):
    return nn.gelu_approx if name == "gelu_pytorch_tanh" else nn.gelu


class VisionAttention(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        h, d, clip = v.hidden_size, v.head_dim, v.use_clipped_linears
        self.n_heads, self.n_kv, self.head_dim = v.num_attention_heads, v.num_key_value_heads, d
        self.eps = v.rms_norm_eps
        self.q_proj = ClippableLinear(h, self.n_heads * d, clip)
        self.k_proj = ClippableLinear(h, self.n_kv * d, clip)
        self.v_proj = ClippableLinear(h, self.n_kv * d, clip)
        self.o_proj = ClippableLinear(self.n_heads * d, h, clip)
        self.q_norm = RMSNorm(d, v.rms_norm_eps)
        self.k_norm = RMSNorm(d, v.rms_norm_eps)

    def __call__(self, x, cos, sin):
        """x [N, H] (one image's patches), full attention."""
        N = x.shape[0]
        q = axial_rope(self.q_norm(self.q_proj(x).reshape(N, self.n_heads, self.head_dim)), cos, sin)
        k = axial_rope(self.k_norm(self.k_proj(x).reshape(N, self.n_kv, self.head_dim)), cos, sin)
        v = rms_norm(self.v_proj(x).reshape(N, self.n_kv, self.head_dim), None, self.eps)
        q, k, v = (t.transpose(1, 0, 2)[None] for t in (q, k, v))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0)
        return self.o_proj(out[0].transpose(1, 0, 2).reshape(N, -1))


class VisionMLP(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        clip = v.use_clipped_linears
        self.gate_proj = ClippableLinear(v.hidden_size, v.intermediate_size, clip)
        self.up_proj = ClippableLinear(v.hidden_size, v.intermediate_size, clip)
        self.down_proj = ClippableLinear(v.intermediate_size, v.hidden_size, clip)
        self._act = _activation(v.hidden_activation)

    def __call__(self, x):
        return self.down_proj(self._act(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(v)
        self.mlp = VisionMLP(v)
        self.input_layernorm = RMSNorm(v.hidden_size, v.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(v.hidden_size, v.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(v.hidden_size, v.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(v.hidden_size, v.rms_norm_eps)

    def __call__(self, x, cos, sin):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


def _activation_dtype(linear) -> mx.Dtype:
    return linear.scales.dtype if isinstance(linear, nn.QuantizedLinear) else linear.weight.dtype


class PatchEmbedder(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * v.patch_size**2, v.hidden_size, bias=False)
        self.position_embedding_table = mx.zeros((2, v.position_embedding_size, v.hidden_size))

    def __call__(self, patches, positions):
        # Gemma 4 normalises pixels in the model: [0, 1] -> [-1, 1].
        h = self.input_proj((2 * (patches - 0.5)).astype(_activation_dtype(self.input_proj)))
        table = self.position_embedding_table
        return h + (table[0][positions[:, 0]] + table[1][positions[:, 1]])


class Embedder(nn.Module):
    """DiffusionGemmaMultimodalEmbedder: a weightless RMSNorm, then a projection to the text hidden size."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        self.eps = v.rms_norm_eps
        self.embedding_projection = nn.Linear(v.output_dim, v.text_hidden_size, bias=False)

    def __call__(self, x):
        return self.embedding_projection(rms_norm(x, None, self.eps))


class VisionTower(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self._config = v
        self.patch_embedder = PatchEmbedder(v)
        self.layers = [VisionLayer(v) for _ in range(v.num_hidden_layers)]
        if v.standardize:
            self.std_bias = mx.zeros((v.hidden_size,))
            self.std_scale = mx.ones((v.hidden_size,))
        self.embedder = Embedder(v)
        self._inv_freq = mx.array(v.rope_inv_freq())  # not a parameter (leading _)

    @property
    def dtype(self):
        return _activation_dtype(self.patch_embedder.input_proj)

    def rope(self, positions, dtype):
        """cos, sin [N, head_dim]: the reference's [x, x, y, y] layout of float32 angles, cast to dtype."""
        freqs = positions[..., None].astype(mx.float32) * self._inv_freq  # [N, 2, head_dim // 4]
        fx, fy = freqs[:, 0], freqs[:, 1]
        angles = mx.concatenate([fx, fx, fy, fy], axis=-1)
        return mx.cos(angles).astype(dtype), mx.sin(angles).astype(dtype)

    def features(self, image: PreprocessedImage):
        """The tower's pooled, scaled (and standardised) output for one image: [num_soft_tokens, hidden]."""
        v = self._config
        positions = mx.array(image.positions.astype("int32"))
        x = self.patch_embedder(mx.array(image.patches), positions)
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        k, p = v.pooling_kernel_size, v.patch_size
        ph, pw = image.height // p, image.width // p
        grid = x.astype(mx.float32).reshape(ph // k, k, pw // k, k, -1)
        pooled = (grid.sum(axis=(1, 3)) / k**2).reshape(-1, grid.shape[-1]).astype(x.dtype)
        h = pooled.astype(mx.float32) * (v.hidden_size**0.5)
        if v.standardize:
            h = (h - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return h.astype(x.dtype)

    def embed(self, features):
        return self.embedder(features)

    def __call__(self, images: list[PreprocessedImage]):
        """Soft-token embeddings of the images, concatenated in order: [sum of num_soft_tokens, text hidden]."""
        return mx.concatenate([self.embed(self.features(im)) for im in images], axis=0)


_CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")


def load_vision_tower(checkpoint, vision: VisionConfig, dtype) -> VisionTower:
    """Build the tower and load its weights from the checkpoint (quantized linears stay quantized)."""
    raw = {}
    for f in checkpoint.files:
        try:
            shard = mx.load(str(f))
        except Exception as e:  # mlx raises ValueError/RuntimeError on a bad file
            raise CheckpointError(f"{f}: could not read tensor data ({e})") from None
        raw.update({k: t for k, t in shard.items() if sanitize_name(k) is not None})
    weights = sanitize(raw)
    if not vision.use_clipped_linears:  # clip bounds some conversions keep even though the config turns them off
        weights = {n: t for n, t in weights.items() if not n.endswith(_CLIP_BOUNDS)}
    tower = VisionTower(vision)
    if any(n.endswith(".scales") for n in weights):
        def predicate(path, module):
            if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
                return False
            try:
                return infer_quant_params(path, module, weights, {"mode": "affine"})
            except ValueError as e:
                raise CheckpointError(f"{checkpoint.path}: vision tower: {e}") from None

        nn.quantize(tower, class_predicate=predicate)
    want = dict(tree_flatten(tower.parameters()))
    unknown = sorted(set(weights) - set(want))
    if unknown:
        raise CheckpointError(f"{checkpoint.path}: unexpected vision tensor(s) {', '.join(unknown[:3])}")
    missing = sorted(set(want) - set(weights))
    if missing:
        raise CheckpointError(f"{checkpoint.path}: checkpoint lacks vision tensor(s) {', '.join(missing[:3])}"
                              + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    for n, t in weights.items():
        if tuple(t.shape) != tuple(want[n].shape):
            raise CheckpointError(f"{checkpoint.path}: vision tensor {n} has shape {tuple(t.shape)}, the vision "
                                  f"config implies {tuple(want[n].shape)}")
    cast = [(n, t if t.dtype in (mx.uint32, mx.uint8) else t.astype(dtype)) for n, t in weights.items()]
    tower.load_weights(cast, strict=True)
    mx.eval(tower.parameters())
    return tower.eval()


def merge_image_embeddings(token_embeds, token_ids, image_token_id: int, soft):
    """token_embeds [B, T, H] with the image tokens' rows replaced by `soft` [N, H] in row-major order (the
    reference's masked_scatter); the image tokens must number N."""
    B, T, H = token_embeds.shape
    flat = np.flatnonzero(np.asarray(token_ids).reshape(-1) == image_token_id)
    if len(flat) != soft.shape[0]:
        raise ValueError(f"{len(flat)} image tokens in the prompt for {soft.shape[0]} image features")
    out = token_embeds.reshape(B * T, H)
    out[mx.array(flat.astype(np.int32))] = soft.astype(out.dtype)
    return out.reshape(B, T, H)


def prompt_embeddings(backend, token_ids, images: list[PreprocessedImage]):
    """float32 host array [T, hidden]: the prompt's token embeddings with its images' soft tokens in place of the
    image tokens (what the backend's prefill takes as `input_embeds`). The tower is loaded on first use."""
    vision = VisionConfig.from_dict(backend.checkpoint.raw_config, str(backend.checkpoint.path / "config.json"))
    ids = np.asarray(token_ids, dtype=np.int32)[None]
    embeds = backend.model.embed(mx.array(ids))
    if images:
        tower = getattr(backend, "_vision_tower", None)
        if tower is None:
            tower = backend._vision_tower = load_vision_tower(backend.checkpoint, vision, backend.dtype)
        cache = backend.__dict__.setdefault("_tower_cache", TowerCache())
        embeds = merge_image_embeddings(embeds, ids, vision.image_token_id,
                                        cache.features(images, tower, mx.concatenate))
    return np.array(embeds[0].astype(mx.float32))
