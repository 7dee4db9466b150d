"""Model and sampler configuration, read from a checkpoint's config.json and generation_config.json.

ModelConfig is the text backbone; VisionConfig the Gemma 4 vision tower that the released checkpoint carries.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

SUPPORTED_MODEL_TYPES = ("diffusion_gemma",)


@dataclass(frozen=True)
class LayerSpec:
    """What differs between the two kinds of attention layer."""

    sliding: bool
    head_dim: int
    num_kv_heads: int
    rope_theta: float
    # Fraction of each head's dims that rotate. "proportional" RoPE (full layers) keeps the frequency denominator at
    # the whole head_dim and zero-fills the rest, which is not the same as "default" RoPE on a smaller dim.
    partial_rotary_factor: float
    rope_type: str
    rope_factor: float = 1.0

    def rope_inv_freq(self):
        """RoPE inverse frequencies (numpy float32, head_dim // 2 of them) exactly as the reference builds them:
        "proportional" keeps the denominator at the whole head_dim and zero-fills the dims that do not rotate."""
        import numpy as np

        if self.rope_type == "proportional":
            angles = int(self.partial_rotary_factor * self.head_dim // 2)
            exps = np.arange(0, 2 * angles, 2, dtype=np.int64).astype(np.float32) / np.float32(self.head_dim)
            rot = (1.0 / (np.float32(self.rope_theta) ** exps)).astype(np.float32)
            inv = np.concatenate([rot, np.zeros(self.head_dim // 2 - angles, np.float32)])
            return (inv / np.float32(self.rope_factor)).astype(np.float32)
        dim = int(self.head_dim * self.partial_rotary_factor)
        exps = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
        return (1.0 / (np.float32(self.rope_theta) ** exps)).astype(np.float32)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    layers: tuple[LayerSpec, ...]
    sliding_window: int
    rms_norm_eps: float
    final_logit_softcapping: float | None
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    max_position_embeddings: int
    hidden_activation: str
    canvas_length: int
    pad_token_id: int | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    dtype: str
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5

    def rope_inv_freqs(self) -> dict:
        """{"sliding": ..., "full": ...} inverse frequencies (numpy float32) of the two kinds of attention layer."""
        out = {}
        for spec in self.layers:
            out.setdefault("sliding" if spec.sliding else "full", spec.rope_inv_freq())
        return out

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> "ModelConfig":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type is {model_type!r}, but dgemma runs DiffusionGemma checkpoints "
                f"(model_type 'diffusion_gemma')"
            )
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: missing the 'text_config' block")

        def need(key: str):
            if text.get(key) is None:
                raise ConfigError(f"{source}: text_config.{key} is missing")
            return text[key]

        if text.get("use_bidirectional_attention") == "all":
            raise ConfigError(
                f"{source}: use_bidirectional_attention='all' (a bidirectional encoder) is not supported; "
                "DiffusionGemma's encoder is causal"
            )
        n_layers = int(need("num_hidden_layers"))
        layer_types = text.get("layer_types") or [
            "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layers)
        ]
        if len(layer_types) != n_layers:
            raise ConfigError(f"{source}: layer_types has {len(layer_types)} entries for {n_layers} layers")
        layer_types = list(layer_types)
        bad = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
        if bad:
            raise ConfigError(f"{source}: unknown layer type(s) {bad}")
        # The reference forces the last layer to full attention.
        layer_types[-1] = "full_attention"

        head_dim = int(need("head_dim"))
        n_kv = int(need("num_key_value_heads"))
        n_heads = int(need("num_attention_heads"))
        # Keys are layer indices as strings, zero-padded by save_pretrained when there are 10+ layers ("05").
        try:
            per_layer = {int(k): v for k, v in (text.get("per_layer_config") or {}).items()}
        except ValueError:
            raise ConfigError(f"{source}: text_config.per_layer_config keys must be layer indices") from None
        global_head_dim = int(text.get("global_head_dim") or 512)
        global_kv = text.get("num_global_key_value_heads")
        rope = text.get("rope_parameters") or {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        }
        specs = []
        for i, kind in enumerate(layer_types):
            sliding = kind == "sliding_attention"
            if sliding:
                hd, kv = head_dim, n_kv
            elif per_layer:
                over = per_layer.get(i, {})
                hd, kv = int(over.get("head_dim", head_dim)), int(over.get("num_key_value_heads", n_kv))
            else:  # a config written without per_layer_config: the reference derives it from these two keys
                hd, kv = global_head_dim, int(global_kv) if global_kv is not None else n_kv
            r = rope.get(kind)
            if not r or "rope_theta" not in r:
                raise ConfigError(f"{source}: text_config.rope_parameters.{kind}.rope_theta is missing")
            rope_type = r.get("rope_type", "default")
            if rope_type not in ("default", "proportional"):
                raise ConfigError(f"{source}: rope_type {rope_type!r} for {kind} layers is not supported")
            if n_heads % kv:
                raise ConfigError(f"{source}: layer {i}: {n_heads} query heads do not divide into {kv} KV heads")
            specs.append(LayerSpec(sliding, hd, kv, float(r["rope_theta"]), float(r.get("partial_rotary_factor", 1.0)),
                                   rope_type, float(r.get("factor", 1.0))))

        eos = cfg.get("eos_token_id", text.get("eos_token_id"))
        eos_ids = tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        softcap = text.get("final_logit_softcapping", 30.0)  # a class default: save_pretrained does not write it
        act = text.get("hidden_activation", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"{source}: hidden_activation {act!r} is not supported")
        try:
            return cls(
                vocab_size=int(need("vocab_size")),
                hidden_size=int(need("hidden_size")),
                intermediate_size=int(need("intermediate_size")),
                num_hidden_layers=n_layers,
                num_attention_heads=n_heads,
                num_key_value_heads=n_kv,
                head_dim=head_dim,
                layer_types=tuple(layer_types),
                layers=tuple(specs),
                sliding_window=int(text.get("sliding_window") or 512),
                rms_norm_eps=float(text.get("rms_norm_eps") or 1e-6),
                final_logit_softcapping=None if softcap is None else float(softcap),
                num_experts=int(need("num_experts")),
                top_k_experts=int(need("top_k_experts")),
                moe_intermediate_size=int(need("moe_intermediate_size")),
                max_position_embeddings=int(text.get("max_position_embeddings") or 131_072),
                hidden_activation=act,
                canvas_length=int(cfg.get("canvas_length") or 256),
                pad_token_id=cfg.get("pad_token_id", text.get("pad_token_id", 0)),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                bos_token_id=text.get("bos_token_id", 2),
                dtype=str(cfg.get("dtype") or text.get("dtype") or cfg.get("torch_dtype") or "bfloat16"),
                raw=cfg,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(read_json(path), source=str(path))


@dataclass(frozen=True)
class SamplerSettings:
    """The denoising sampler's knobs; the defaults are the model's documented ones (generation_config.json of the
    released checkpoint, and `DiffusionGemmaGenerationConfig._get_default_generation_params`)."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = 0

    def validate(self) -> "SamplerSettings":
        def bad(msg: str):
            raise ConfigError(f"invalid sampler setting: {msg}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            bad(f"max_new_tokens must be a positive integer (got {self.max_new_tokens})")
        if not isinstance(self.max_denoising_steps, int) or self.max_denoising_steps <= 0:
            bad(f"max_denoising_steps must be a positive integer (got {self.max_denoising_steps})")
        if not (isinstance(self.entropy_bound, (int, float)) and self.entropy_bound > 0 and math.isfinite(self.entropy_bound)):
            bad(f"entropy_bound must be a number > 0 (got {self.entropy_bound})")
        for name in ("t_min", "t_max"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                bad(f"{name} must be a number > 0 (got {v})")
        if self.t_min > self.t_max:
            bad(f"t_min ({self.t_min}) must not exceed t_max ({self.t_max})")
        if not isinstance(self.stability_threshold, int) or self.stability_threshold < 0:
            bad(f"stability_threshold must be an integer >= 0 (got {self.stability_threshold})")
        if not isinstance(self.confidence_threshold, (int, float)) or self.confidence_threshold <= 0:
            bad(f"confidence_threshold must be a number > 0 (got {self.confidence_threshold})")
        return self

    def updated(self, **overrides: Any) -> "SamplerSettings":
        """A copy with the non-None overrides applied (unknown names are an error)."""
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise ConfigError(f"unknown sampler setting(s): {', '.join(sorted(unknown))}")
        changes = {k: v for k, v in overrides.items() if v is not None}
        if "eos_token_ids" in changes:
            e = changes["eos_token_ids"]
            changes["eos_token_ids"] = tuple([e] if isinstance(e, int) else e)
        return replace(self, **changes).validate()

    @classmethod
    def from_generation_config(cls, gen: dict | None, model: ModelConfig | None = None) -> "SamplerSettings":
        """Values from generation_config.json; `null` (as save_pretrained writes unset fields) falls back to the
        model defaults, and eos/pad fall back to config.json's."""
        gen = gen or {}
        base = cls()
        kw: dict[str, Any] = {}
        for name in ("max_new_tokens", "max_denoising_steps", "t_min", "t_max", "stability_threshold",
                     "confidence_threshold"):
            if gen.get(name) is not None:
                kw[name] = gen[name]
        sc = gen.get("sampler_config")
        if isinstance(sc, dict) and sc.get("entropy_bound") is not None:
            kw["entropy_bound"] = float(sc["entropy_bound"])
        eos = gen.get("eos_token_id")
        if eos is None and model is not None:
            eos = list(model.eos_token_ids)
        kw["eos_token_ids"] = tuple([eos] if isinstance(eos, int) else (eos or []))
        pad = gen.get("pad_token_id")
        kw["pad_token_id"] = pad if pad is not None else (model.pad_token_id if model is not None else base.pad_token_id)
        for k in ("max_new_tokens", "max_denoising_steps", "stability_threshold"):
            if k in kw and isinstance(kw[k], float) and kw[k].is_integer():
                kw[k] = int(kw[k])
        try:
            return replace(base, **kw).validate()
        except ConfigError as e:
            raise ConfigError(f"generation_config.json: {e}") from None


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


@dataclass(frozen=True)
class VisionConfig:
    """The Gemma 4 vision tower (`vision_config`, model type gemma4_vision) and how its soft tokens enter the prompt.

    `bidirectional` is the text config's `use_bidirectional_attention == "vision"`: the encoder then lets the tokens of
    one image attend to each other both ways (the reference's `mm_token_type_ids` blocks); otherwise they are causal."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    patch_size: int
    pooling_kernel_size: int
    position_embedding_size: int
    use_clipped_linears: bool
    standardize: bool
    output_dim: int  # the embedder's input width: `output_proj_dims` when present, else hidden_size
    text_hidden_size: int
    image_token_id: int
    boi_token_id: int
    eoi_token_id: int
    bidirectional: bool
    hidden_activation: str = "gelu_pytorch_tanh"

    def rope_inv_freq(self):
        """Axial RoPE inverse frequencies (numpy float32, head_dim // 4 of them) as the reference builds them: the
        same frequencies rotate the x half and the y half of each head."""
        import numpy as np

        spatial = self.head_dim // 2
        exps = np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial)
        return (1.0 / (np.float32(self.rope_theta) ** exps)).astype(np.float32)

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> "VisionConfig | None":
        """None when the checkpoint has no vision tower (no `vision_config`)."""
        vision = cfg.get("vision_config")
        if not vision:
            return None
        if not isinstance(vision, dict):
            raise ConfigError(f"{source}: vision_config must be an object")
        if vision.get("model_type", "gemma4_vision") != "gemma4_vision":
            raise ConfigError(f"{source}: vision_config.model_type is {vision.get('model_type')!r}; dgemma runs the "
                              "Gemma 4 vision tower (gemma4_vision)")
        text = cfg.get("text_config") or {}
        act = vision.get("hidden_activation", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"{source}: vision_config.hidden_activation {act!r} is not supported")
        rope = vision.get("rope_parameters") or {}
        # Class defaults of Gemma4VisionConfig: save_pretrained writes only what differs from them.
        get = lambda key, default: default if vision.get(key) is None else vision[key]  # noqa: E731
        try:
            hidden = int(get("hidden_size", 768))
            heads = int(get("num_attention_heads", 12))
            out = cls(
                hidden_size=hidden,
                intermediate_size=int(get("intermediate_size", 3072)),
                num_hidden_layers=int(get("num_hidden_layers", 16)),
                num_attention_heads=heads,
                num_key_value_heads=int(get("num_key_value_heads", 12)),
                head_dim=int(get("head_dim", 64)),
                rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", 100.0)),
                patch_size=int(get("patch_size", 16)),
                pooling_kernel_size=int(get("pooling_kernel_size", 3)),
                position_embedding_size=int(get("position_embedding_size", 10 * 1024)),
                use_clipped_linears=bool(get("use_clipped_linears", False)),
                standardize=bool(get("standardize", False)),
                output_dim=int(get("output_proj_dims", hidden)),
                text_hidden_size=int(text.get("hidden_size") or 0),
                image_token_id=int(cfg.get("image_token_id", 258_880)),
                boi_token_id=int(cfg.get("boi_token_id", 255_999)),
                eoi_token_id=int(cfg.get("eoi_token_id", 258_882)),
                bidirectional=text.get("use_bidirectional_attention") == "vision",
                hidden_activation=act,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: vision_config: {e}") from None
        if out.head_dim % 4 or out.num_attention_heads % out.num_key_value_heads:
            raise ConfigError(f"{source}: vision_config: head_dim must be a multiple of 4 and the query heads a "
                              "multiple of the key/value heads")
        return out
