"""Images in the prompt, backend-neutral: loading, Gemma 4 preprocessing, the chat layout of image tokens.

Preprocessing is transformers 5.23's `Gemma4ImageProcessor` (`image_processing_pil_gemma4.py`) step for step, with
Pillow and numpy only: RGB (transparency composited onto white), an aspect-ratio-preserving bicubic resize to the
largest size whose sides are multiples of pooling_kernel_size x patch_size and that has at most max_soft_tokens x
pooling_kernel_size^2 patches, rescale by 1/255 (float64, then float32), optional normalisation, then 16 x 16 x 3
patches in row-major order with their (x, y) patch positions. The backends run each image's real patches alone, so
the padding to max_patches (positions (-1, -1)) that the reference batches with is only built by `padded()`.

In the prompt an image is boi + image_token x num_soft_tokens + eoi, put where the chat template writes the image
token (`Gemma4Processor.replace_image_token`); the soft-token embeddings then replace those image tokens' embeddings.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import VisionConfig
from .errors import CheckpointError, InputError

SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
# Pillow's own default bomb limit (about 89.5 megapixels): larger images are refused, not merely warned about.
MAX_IMAGE_PIXELS = 89_478_485
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the processor's default


@dataclass(frozen=True)
class ImageSettings:
    """The image processor's parameters; the defaults are Gemma4ImageProcessor's class defaults."""

    patch_size: int = 16
    max_soft_tokens: int = 280
    pooling_kernel_size: int = 3
    do_resize: bool = True
    resample: int = BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    image_std: tuple[float, ...] = (1.0, 1.0, 1.0)
    do_convert_rgb: bool = True

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size**2

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "ImageSettings":
        """Read preprocessor_config.json, then processor_config.json's `image_processor` block (transformers 5 writes
        either); keys that neither names keep the processor's defaults."""
        folder = Path(folder)
        values: dict[str, Any] = {}
        for name, block in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
            path = folder / name
            if not path.exists():
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: not valid JSON ({e})") from None
            if block is not None:
                data = data.get(block) if isinstance(data.get(block), dict) else {}
            values.update({k: v for k, v in data.items() if v is not None})
        return cls.from_dict(values, source=str(folder))

    @classmethod
    def from_dict(cls, values: dict, source: str = "processor config") -> "ImageSettings":
        names = {f: values[f] for f in cls.__dataclass_fields__ if f in values}
        for key in ("image_mean", "image_std"):
            if key in names:
                v = names[key]
                names[key] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
        try:
            out = cls(**names)
            int(out.resample)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: image processor settings: {e}") from None
        if out.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise CheckpointError(f"{source}: max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got "
                                  f"{out.max_soft_tokens}")
        return out


@dataclass
class PreprocessedImage:
    """One image as the vision tower takes it: its real patches only, no padding."""

    patches: np.ndarray  # float32 [num_patches, patch_size * patch_size * 3], each patch (row, column, channel)
    positions: np.ndarray  # int64 [num_patches, 2], (x, y) patch coordinates, row-major
    height: int  # after the resize, in pixels
    width: int
    num_soft_tokens: int
    name: str = field(default="image")

    def padded(self, max_patches: int) -> tuple[np.ndarray, np.ndarray]:
        """(pixel_values, position_ids) padded to max_patches as the reference processor returns them: zero patches
        at positions (-1, -1)."""
        n = len(self.patches)
        pixels = np.zeros((max_patches, self.patches.shape[1]), np.float32)
        pixels[:n] = self.patches
        positions = np.full((max_patches, 2), -1, np.int64)
        positions[:n] = self.positions
        return pixels, positions


# -- loading -----------------------------------------------------------------------------------------------------
def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError:  # pragma: no cover
        raise InputError("images need Pillow: pip install pillow") from None
    return Image, ImageOps


def describe_source(source: Any, index: int | None = None) -> str:
    """The name an error message uses for an image: its path, or 'image N (bytes)' and the like."""
    if isinstance(source, (str, os.PathLike)) and not str(source).startswith("data:"):
        return str(source)
    kind = ("data URL" if isinstance(source, str) else "bytes" if isinstance(source, (bytes, bytearray, memoryview))
            else "numpy array" if isinstance(source, np.ndarray) else type(source).__name__)
    return f"image {index + 1} ({kind})" if index is not None else f"image ({kind})"


def _decode_data_url(url: str, name: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        raise InputError(f"{name}: a data URL must look like data:image/<type>;base64,<data>")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{name}: the data URL's base64 payload is invalid ({e})") from None


def open_image(source: Any, name: str | None = None):
    """A decoded PIL image, upright (EXIF orientation applied), first frame of an animation, from a path, a data:
    URL, bytes, a PIL image or a numpy array (returned as is: arrays have no EXIF). Refuses decompression bombs
    (more than MAX_IMAGE_PIXELS) and broken or non-image files with one InputError naming the image."""
    Image, ImageOps = _pil()
    name = name or describe_source(source)
    if isinstance(source, np.ndarray):
        if source.size > 4 * MAX_IMAGE_PIXELS:
            raise InputError(f"{name}: too large an image ({source.shape}, over {MAX_IMAGE_PIXELS} pixels)")
        return source
    if isinstance(source, Image.Image):
        _check_pixels(source.size, name)
        return ImageOps.exif_transpose(source)
    if isinstance(source, str) and source.startswith("data:"):
        source = _decode_data_url(source, name)
    elif isinstance(source, str) and source.startswith(("http://", "https://")):
        raise InputError(f"{name}: remote image URLs are not fetched; download the image and pass its path or bytes")
    if isinstance(source, (bytes, bytearray, memoryview)):
        stream = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"{name}: image file not found")
        stream = path
    else:
        raise InputError(f"{name}: an image must be a path, bytes, a data URL, a PIL image or a numpy array")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(stream)
            _check_pixels(img.size, name)
            img.seek(0)  # animated GIF / WebP: the first frame
            img.load()
            return ImageOps.exif_transpose(img)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{name}: too large an image (over {MAX_IMAGE_PIXELS} pixels; a decompression "
                         "bomb?)") from None
    except Exception as e:  # Pillow raises many types for malformed input (OSError, SyntaxError, ValueError, ...)
        raise InputError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None


def _check_pixels(size: tuple[int, int], name: str) -> None:
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise InputError(f"{name}: too large an image ({size[0]}x{size[1]}, over {MAX_IMAGE_PIXELS} pixels; a "
                         "decompression bomb?)")
    if size[0] < 1 or size[1] < 1:
        raise InputError(f"{name}: an empty image ({size[0]}x{size[1]})")


def to_rgb(image, name: str = "image") -> np.ndarray:
    """uint8 [H, W, 3] exactly as the processor's convert_to_rgb: transparency composited onto white (PIL's
    alpha_composite for PIL images, the rounded blend for RGBA arrays), greyscale repeated over three channels."""
    Image, _ = _pil()
    if isinstance(image, Image.Image):
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.array(image.convert("RGB"))
    return _array_to_rgb(np.asarray(image), name)


def _array_to_rgb(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels first
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or 0 in a.shape:
        raise InputError(f"{name}: an image array must be [H, W], [H, W, 1|3|4] or [1|3|4, H, W] (got {a.shape})")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise InputError(f"{name}: a float image array must hold values in [0, 1]")
        a = np.round(a * 255)  # floats are taken as [0, 1] intensities (the reference has no single rule for them)
    elif not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() > 255:
        raise InputError(f"{name}: an integer image array must hold values in [0, 255]")
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1).astype(np.uint8)
    if a.shape[-1] == 4:
        alpha = a[..., 3:4] / 255
        a = np.round(alpha * a[..., :3] + (1 - alpha) * 255)
    return a.astype(np.uint8)


# -- preprocessing -----------------------------------------------------------------------------------------------
def target_size(height: int, width: int, settings: ImageSettings, name: str = "image") -> tuple[int, int]:
    """The resized (height, width): Gemma4's get_aspect_ratio_preserving_size."""
    p, k = settings.patch_size, settings.pooling_kernel_size
    max_patches = settings.max_patches
    factor = math.sqrt(max_patches * p**2 / (height * width))
    side = k * p
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    if th == 0 and tw == 0:
        raise InputError(f"{name}: {width}x{height} cannot be resized to a whole number of {side}-pixel cells")
    max_side = (max_patches // k**2) * side
    if th == 0:
        th, tw = side, min(int(math.floor(width / height)) * side, max_side)
    elif tw == 0:
        tw, th = side, min(int(math.floor(height / width)) * side, max_side)
    if th * tw > max_patches * p**2:
        raise InputError(f"{name}: {width}x{height} is too elongated to fit {max_patches} patches")
    return th, tw


def num_soft_tokens(height: int, width: int, settings: ImageSettings) -> int:
    """Soft tokens (image tokens in the prompt) for an image of this size, before the resize."""
    th, tw = target_size(height, width, settings) if settings.do_resize else (height, width)
    return (th // settings.patch_size) * (tw // settings.patch_size) // settings.pooling_kernel_size**2


def preprocess(source: Any, settings: ImageSettings, name: str | None = None) -> PreprocessedImage:
    """Load one image and turn it into the vision tower's patches, exactly as Gemma4ImageProcessor does."""
    Image, _ = _pil()
    name = name or describe_source(source)
    image = open_image(source, name)
    if settings.do_convert_rgb:
        rgb = to_rgb(image, name)
    else:
        rgb = np.array(image) if isinstance(image, Image.Image) else np.asarray(image)
        if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
            raise InputError(f"{name}: this checkpoint does not convert to RGB; pass an 8-bit RGB image")
    h, w = rgb.shape[:2]
    if settings.do_resize:
        th, tw = target_size(h, w, settings, name)
        if (th, tw) != (h, w):
            rgb = np.array(Image.fromarray(rgb).resize((tw, th), resample=settings.resample))
    chw = np.moveaxis(rgb, -1, 0)
    pixels = chw.astype(np.float64) * settings.rescale_factor if settings.do_rescale else chw
    pixels = pixels.astype(np.float32)
    if settings.do_normalize:
        mean = np.array(settings.image_mean, np.float32)[:, None, None]
        std = np.array(settings.image_std, np.float32)[:, None, None]
        pixels = (pixels - mean) / std
    p, k = settings.patch_size, settings.pooling_kernel_size
    c, H, W = pixels.shape
    ph, pw = H // p, W // p
    if ph % k or pw % k or ph * p != H or pw * p != W:
        raise InputError(f"{name}: {W}x{H} pixels are not whole {k * p}-pixel cells (do_resize is off)")
    patches = pixels.reshape(c, ph, p, pw, p).transpose(1, 3, 2, 4, 0).reshape(ph * pw, -1)
    gx, gy = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
    positions = np.stack([gx, gy], axis=-1).reshape(ph * pw, 2).astype(np.int64)
    return PreprocessedImage(np.ascontiguousarray(patches), positions, H, W, ph * pw // k**2, name)


# -- the prompt --------------------------------------------------------------------------------------------------
IMAGE_PART_TYPES = ("image", "image_url")


def image_source(part: dict, where: str) -> Any:
    """The image a content part names: {"type": "image", "image" | "url" | "path": X} (transformers' form) or
    {"type": "image_url", "image_url": {"url": X}} (OpenAI's; a bare string is accepted too)."""
    if part.get("type") == "image_url":
        v = part.get("image_url")
        v = v.get("url") if isinstance(v, dict) else v
    else:
        v = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
    if v is None:
        raise InputError(f"{where}: an image part needs the image ('image', 'url' or 'path'; 'image_url' for "
                         "type image_url)")
    return v


def split_images(messages: list[dict]) -> tuple[list[dict], list[Any]]:
    """(messages for the chat template, the image sources in prompt order): each image part becomes
    {"type": "image"}, which Gemma's template renders as the image token."""
    if not isinstance(messages, list):
        return messages, []
    out, sources = [], []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES:
                sources.append(image_source(part, f"messages[{i}].content[{j}]"))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        out.append({**m, "content": parts})
    return out, sources


def has_images(messages: Any) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES for p in m["content"]) for m in messages)


@dataclass
class ImagePrompt:
    """A chat prompt with its images: token ids with the image tokens laid out, and the images in prompt order."""

    token_ids: list[int]
    images: list[PreprocessedImage]


def image_tokens(tokenizer, vision: VisionConfig) -> tuple[str, str, str]:
    """(image, boi, eoi) token strings, from config.json's ids (the ids the model scatters its features into)."""
    out = []
    for what in ("image_token_id", "boi_token_id", "eoi_token_id"):
        tid = getattr(vision, what)
        tok = tokenizer.id_to_token(tid)
        if tok is None:
            raise CheckpointError(f"{tokenizer.source}: has no token for config.json's {what} {tid}")
        out.append(tok)
    return out[0], out[1], out[2]


def encode_image_chat(tokenizer, vision: VisionConfig | None, settings: ImageSettings, messages: list[dict],
                      add_generation_prompt: bool = True, model_path: str = "the model") -> ImagePrompt:
    """Render chat messages with image parts and lay out each image's tokens (boi + image x n + eoi)."""
    template_messages, sources = split_images(messages)
    if sources and vision is None:
        raise InputError(f"{model_path}: this model has no vision tower (no vision_config in config.json), so it "
                         "cannot take images")
    if not sources:
        return ImagePrompt(tokenizer.encode_chat(template_messages, add_generation_prompt), [])
    images = [preprocess(s, settings, describe_source(s, i)) for i, s in enumerate(sources)]
    image, boi, eoi = image_tokens(tokenizer, vision)
    ids = tokenizer.encode_chat_with_images(template_messages, [im.num_soft_tokens for im in images],
                                            image_token=image, boi_token=boi, eoi_token=eoi,
                                            add_generation_prompt=add_generation_prompt)
    return ImagePrompt(ids, images)


def image_block_ids(token_ids, image_token_id: int) -> np.ndarray:
    """int32 [..., T]: k > 0 on the tokens of the k-th image of each row (a run of image tokens), 0 elsewhere: the
    reference's block_sequence_ids from mm_token_type_ids, counted from 1 per row."""
    ids = np.asarray(token_ids)
    is_image = ids == image_token_id
    prev = np.zeros_like(is_image)
    prev[..., 1:] = is_image[..., :-1]
    starts = is_image & ~prev
    return np.where(is_image, np.cumsum(starts, axis=-1), 0).astype(np.int32)


def vision_tensor_shapes(vision: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every vision tensor a checkpoint holds, by its Hugging Face name, with its shape from the config."""
    h, d, i = vision.hidden_size, vision.head_dim, vision.intermediate_size
    nq, nkv = vision.num_attention_heads, vision.num_key_value_heads
    tower = "model.encoder.vision_tower."
    out = {tower + "patch_embedder.input_proj.weight": (h, 3 * vision.patch_size**2),
           tower + "patch_embedder.position_embedding_table": (2, vision.position_embedding_size, h),
           "model.encoder.embed_vision.embedding_projection.weight": (vision.text_hidden_size, vision.output_dim)}
    if vision.standardize:
        out[tower + "std_bias"] = (h,)
        out[tower + "std_scale"] = (h,)
    linears = {"self_attn.q_proj": (nq * d, h), "self_attn.k_proj": (nkv * d, h), "self_attn.v_proj": (nkv * d, h),
               "self_attn.o_proj": (h, nq * d), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    for n in range(vision.num_hidden_layers):
        layer = f"{tower}encoder.layers.{n}."
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            out[f"{layer}{norm}.weight"] = (h,)
        out[f"{layer}self_attn.q_norm.weight"] = (d,)
        out[f"{layer}self_attn.k_norm.weight"] = (d,)
        for lin, shape in linears.items():
            out[f"{layer}{lin}.linear.weight"] = shape
            if vision.use_clipped_linears:
                for clip in ("input_min", "input_max", "output_min", "output_max"):
                    out[f"{layer}{lin}.{clip}"] = ()
    return out


class ModelImages:
    """What one loaded model needs to take images: its vision config, its image processor's settings, its tokenizer.
    The vision tower itself lives in the backend (`Backend.image_embeddings`), loaded on the first image."""

    def __init__(self, checkpoint, tokenizer):
        self.checkpoint = checkpoint
        self.tokenizer = tokenizer
        self.vision = VisionConfig.from_dict(checkpoint.raw_config, str(Path(checkpoint.path) / "config.json"))
        self.settings = ImageSettings.from_folder(checkpoint.path) if self.vision is not None else ImageSettings()

    def encode(self, messages: list[dict], add_generation_prompt: bool = True) -> ImagePrompt:
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer: images need chat messages")
        return encode_image_chat(self.tokenizer, self.vision, self.settings, messages, add_generation_prompt,
                                 model_path=str(self.checkpoint.path))

    def request_inputs(self, backend, prompts: list[ImagePrompt]) -> list[dict]:
        """Per prompt, the engine request's {"input_embeds": [T, hidden], "image_blocks": [T]}: for every prompt of
        a batch where any prompt has images (the others as their plain token embeddings), else {} for each."""
        if not any(p.images for p in prompts):
            return [{} for _ in prompts]
        out = []
        for p in prompts:
            blocks = image_block_ids(p.token_ids, self.vision.image_token_id) if self.vision is not None else None
            if blocks is None or not self.vision.bidirectional:
                blocks = np.zeros(len(p.token_ids), np.int32)  # image tokens causal, as the reference then does
            out.append({"input_embeds": backend.image_embeddings(p.token_ids, p.images), "image_blocks": blocks})
        return out


class TowerCache:
    """The vision tower's output for the last `capacity` distinct images (keyed by their patches and positions), so a
    follow-up turn that resends a conversation's images does not run the tower on them again."""

    def __init__(self, capacity: int = 32):
        from collections import OrderedDict

        self.capacity = capacity
        self.entries: "OrderedDict[bytes, object]" = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(image: "PreprocessedImage") -> bytes:
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        h.update(np.ascontiguousarray(image.patches).tobytes())
        h.update(np.ascontiguousarray(image.positions).tobytes())
        return h.digest()

    def features(self, images: list, tower, concat):
        """concat([tower([image]) for image in images]) with each image's part taken from the cache when there."""
        parts = []
        for image in images:
            k = self.key(image)
            if k in self.entries:
                self.entries.move_to_end(k)
                self.hits += 1
            else:
                self.misses += 1
                self.entries[k] = tower([image])
                while len(self.entries) > self.capacity:
                    self.entries.popitem(last=False)
            parts.append(self.entries[k])
        return concat(parts)
