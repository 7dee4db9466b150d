"""The Gemma 4 vision tower and DiffusionGemma's multimodal embedder in PyTorch: preprocessed images -> the soft-token
embeddings [n_tokens, text hidden] that replace the image tokens' embeddings in the encoder.

Weight names follow the checkpoint's (`sanitize()` drops the `model.encoder.vision_tower.encoder.` prefixes and the
`.linear` of the clippable linears). Numerics follow transformers' `Gemma4VisionModel` op for op where it matters:
float32 RMSNorm via pow(-0.5), axial RoPE tables in float32 cast to the activations' dtype, attention scale 1.0,
pooling and the sqrt(hidden) scale and standardisation in float32. Each image runs alone over its real patches: the
reference pads every image to max_patches and masks the padding out of attention, which leaves the real patches'
outputs the same.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dgemma.config import VisionConfig
from dgemma.errors import CheckpointError
from dgemma.vision import PreprocessedImage, TowerCache, vision_tensor_shapes

from .model import RMSNorm, apply_rope, rms_norm

_PREFIXES = (("model.encoder.vision_tower.", ""), ("model.vision_tower.", ""), ("vision_tower.", ""),
             ("model.encoder.embed_vision.", "embedder."), ("model.embed_vision.", "embedder."),
             ("embed_vision.", "embedder."))


def sanitize(name: str) -> str | None:
    """Map a checkpoint tensor name onto this module's names; None for tensors that are not the vision tower's."""
    for prefix, ours in _PREFIXES:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            rest = re.sub(r"^encoder\.layers\.", "layers.", rest)
            return ours + rest.replace(".linear.", ".")
    return None


def expected_shapes(vision: VisionConfig) -> dict[str, tuple[int, ...]]:
    return {sanitize(n): s for n, s in vision_tensor_shapes(vision).items()}


class ClippableLinear(nn.Module):
    """A bias-free linear whose input and output are clamped to stored bounds when the config asks for it."""

    def __init__(self, n_in: int, n_out: int, clipped: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.clipped = clipped
        if clipped:
            for name in ("input_min", "input_max", "output_min", "output_max"):
                self.register_buffer(name, torch.tensor(float("-inf") if name.endswith("min") else float("inf")))

    def forward(self, x):
        if self.clipped:
            x = torch.clamp(x, self.input_min, self.input_max)
        x = F.linear(x, self.weight)
        return torch.clamp(x, self.output_min, self.output_max) if self.clipped else x


def _activation(name: str):
    return (lambda x: F.gelu(x, approximate="tanh")) if name == "gelu_pytorch_tanh" else F.gelu


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

    def forward(self, x, cos, sin):
        """x [1, N, H]; cos, sin [N, head_dim] (x half then y half): full attention over one image's patches."""
        B, N, _ = x.shape
        q = axial_rope(self.q_norm(self.q_proj(x).view(B, N, self.n_heads, self.head_dim)), cos, sin)
        k = axial_rope(self.k_norm(self.k_proj(x).view(B, N, self.n_kv, self.head_dim)), cos, sin)
        v = rms_norm(self.v_proj(x).view(B, N, self.n_kv, self.head_dim), None, self.eps)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1.0,
                                             enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, N, -1))


def axial_rope(x, cos, sin):
    """Rotate the first half of each head by the x positions and the second half by the y positions (each half is
    an ordinary rotate-half RoPE of its own), as the reference's apply_multidimensional_rope."""
    half = x.shape[-1] // 2
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([apply_rope(x[..., :half], c[..., :half], s[..., :half]),
                      apply_rope(x[..., half:], c[..., half:], s[..., half:])], dim=-1)


class VisionMLP(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        clip = v.use_clipped_linears
        self.gate_proj = ClippableLinear(v.hidden_size, v.intermediate_size, clip)
        self.up_proj = ClippableLinear(v.hidden_size, v.intermediate_size, clip)
        self.down_proj = ClippableLinear(v.intermediate_size, v.hidden_size, clip)
        self.act = _activation(v.hidden_activation)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(v)
        self.mlp = VisionMLP(v)
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(self, name, RMSNorm(v.hidden_size, v.rms_norm_eps))

    def forward(self, x, cos, sin):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class PatchEmbedder(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * v.patch_size**2, v.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.empty(2, v.position_embedding_size, v.hidden_size))

    def forward(self, patches, positions):
        # Gemma 4 normalises pixels in the model: [0, 1] -> [-1, 1].
        h = self.input_proj((2 * (patches - 0.5)).to(self.input_proj.weight.dtype))
        table = self.position_embedding_table
        return h + (table[0][positions[:, 0]] + table[1][positions[:, 1]])[None]


class Embedder(nn.Module):
    """DiffusionGemmaMultimodalEmbedder: a weightless RMSNorm, then a projection to the text hidden size."""

    def __init__(self, v: VisionConfig):
        super().__init__()
        self.eps = v.rms_norm_eps
        self.embedding_projection = nn.Linear(v.output_dim, v.text_hidden_size, bias=False)

    def forward(self, x):
        return self.embedding_projection(rms_norm(x, None, self.eps))


class VisionTower(nn.Module):
    def __init__(self, v: VisionConfig):
        super().__init__()
        self.config = v
        self.patch_embedder = PatchEmbedder(v)
        self.layers = nn.ModuleList(VisionLayer(v) for _ in range(v.num_hidden_layers))
        if v.standardize:
            self.register_buffer("std_bias", torch.zeros(v.hidden_size))
            self.register_buffer("std_scale", torch.ones(v.hidden_size))
        self.embedder = Embedder(v)
        self.register_buffer("inv_freq", torch.from_numpy(v.rope_inv_freq()), persistent=False)

    @property
    def dtype(self):
        return self.patch_embedder.input_proj.weight.dtype

    def rope(self, positions, dtype):
        """cos, sin [N, head_dim]: the reference's [x, x, y, y] layout of float32 angles, cast to dtype."""
        freqs = positions[..., None].float() * self.inv_freq.float()  # [N, 2, head_dim // 4]
        fx, fy = freqs[:, 0], freqs[:, 1]
        angles = torch.cat([fx, fx, fy, fy], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def features(self, image: PreprocessedImage) -> torch.Tensor:
        """The tower's pooled, scaled (and standardised) output for one image: [num_soft_tokens, hidden]."""
        dev = self.inv_freq.device
        patches = torch.from_numpy(image.patches).to(dev)
        positions = torch.from_numpy(image.positions).to(dev)
        x = self.patch_embedder(patches, positions)
        cos, sin = self.rope(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        k = self.config.pooling_kernel_size
        ph, pw = image.height // self.config.patch_size, image.width // self.config.patch_size
        grid = x[0].float().view(ph // k, k, pw // k, k, -1)
        pooled = (grid.sum(dim=(1, 3)) / k**2).reshape(-1, grid.shape[-1]).to(x.dtype)
        h = pooled.float() * self.config.hidden_size**0.5
        if self.config.standardize:
            h = (h - self.std_bias.float()) * self.std_scale.float()
        return h.to(x.dtype)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return self.embedder(features)

    def forward(self, images: list[PreprocessedImage]) -> torch.Tensor:
        """Soft-token embeddings of the images, concatenated in order: [sum of num_soft_tokens, text hidden]."""
        return torch.cat([self.embed(self.features(im)) for im in images], dim=0)


def load_vision_tower(checkpoint, vision: VisionConfig, device, dtype) -> VisionTower:
    """Build the tower and load its weights from the checkpoint (kept unquantized: see README "Images")."""
    want = expected_shapes(vision)
    names = {n for n in checkpoint.tensors if sanitize(n) in want}
    clip_bounds = ("input_min", "input_max", "output_min", "output_max")  # kept by some conversions, turned off
    extra = sorted(n for n in checkpoint.tensors if sanitize(n) is not None and n not in names
                   and not (n.endswith(clip_bounds) and not vision.use_clipped_linears))
    if extra:  # quantization scales and the like: the tower is loaded unquantized only
        raise CheckpointError(f"{checkpoint.path}: unexpected vision tensor {extra[0]} (a quantized vision tower? "
                              "dgemma runs it unquantized)")
    tower = VisionTower(vision).to(device=device, dtype=dtype)
    params = dict(tower.named_parameters()) | dict(tower.named_buffers())
    seen = set()
    with torch.no_grad():
        for hf_name, tensor in checkpoint.iter_tensors("pt", names):
            ours = sanitize(hf_name)
            if tuple(tensor.shape) != want[ours]:
                raise CheckpointError(f"{checkpoint.tensors[hf_name].file}: tensor {hf_name} has shape "
                                      f"{tuple(tensor.shape)}, the vision config implies {want[ours]}")
            params[ours].copy_(tensor.to(device, params[ours].dtype))
            seen.add(ours)
    missing = sorted(set(want) - seen)
    if missing:
        raise CheckpointError(f"{checkpoint.path}: checkpoint lacks vision tensor(s) {', '.join(missing[:3])}"
                              + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    tower.inv_freq = torch.from_numpy(vision.rope_inv_freq()).to(device)  # float32 whatever the weights' dtype
    for p in tower.parameters():
        p.requires_grad_(False)
    return tower.eval()


def merge_image_embeddings(token_embeds: torch.Tensor, token_ids: torch.Tensor, image_token_id: int,
                           soft: torch.Tensor) -> torch.Tensor:
    """token_embeds [B, T, H] with the image tokens' rows replaced by `soft` [N, H] in row-major order (the
    reference's masked_scatter); the image tokens must number N."""
    mask = token_ids == image_token_id
    n = int(mask.sum())
    if n != soft.shape[0]:
        raise ValueError(f"{n} image tokens in the prompt for {soft.shape[0]} image features")
    out = token_embeds.clone()
    out[mask] = soft.to(out.dtype)
    return out


def prompt_embeddings(backend, token_ids, images: list[PreprocessedImage]):
    """float32 host array [T, hidden]: the prompt's token embeddings with its images' soft tokens in place of the
    image tokens (what the backend's prefill takes as `input_embeds`). The tower is loaded on first use."""
    vision = VisionConfig.from_dict(backend.checkpoint.raw_config, str(backend.checkpoint.path / "config.json"))
    ids = torch.as_tensor(np.asarray(token_ids, dtype=np.int64)[None], device=backend.device)
    with torch.inference_mode():
        embeds = backend.model.embed(ids)
        if images:
            tower = getattr(backend, "_vision_tower", None)
            if tower is None:
                tower = backend._vision_tower = load_vision_tower(backend.checkpoint, vision, backend.device,
                                                                  backend.dtype)
            cache = backend.__dict__.setdefault("_tower_cache", TowerCache())
            embeds = merge_image_embeddings(embeds, ids, vision.image_token_id,
                                            cache.features(images, tower, torch.cat))
    return embeds[0].float().cpu().numpy()
