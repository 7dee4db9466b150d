"""Images in the prompt against the reference: Gemma4ImageProcessor's preprocessing, the vision tower's features and
the merged input embeddings of DiffusionGemma's encoder, on both backends; the chat layout of image tokens."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dgemma.checkpoint import Checkpoint
from dgemma.config import VisionConfig
from dgemma.errors import InputError
from dgemma.vision import (ImageSettings, encode_image_chat, image_block_ids, open_image, preprocess,
                           split_images)

BOI, IMG, EOI = 264, 265, 266  # the extra special tokens the test tokenizer adds after its 8 + 256
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] | trim }}"
    "{% elif item['type'] == 'image' %}{{ '<|image|>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# -- the checkpoint ----------------------------------------------------------------------------------------------
def make_vision_checkpoint(path: Path, seed: int = 0, **vision) -> Path:
    """tests/reference.py's random checkpoint with its vision tower randomised too (the reference initialises it
    near identity), image token ids inside the tiny vocabulary, image blocks bidirectional, and a tokenizer and chat
    template that know the image tokens."""
    import torch
    from reference import make_checkpoint
    from tokenizers import Tokenizer as HFTokenizer

    from dgemma.random_model import build_tokenizer_json

    make_checkpoint(path, canvas_length=16, scale=0.5, seed=seed, use_bidirectional_attention="vision")
    cfg = json.loads((path / "config.json").read_text())
    cfg["vision_config"].update(vision)
    cfg.update(image_token_id=IMG, boi_token_id=BOI, eoi_token_id=EOI)
    (path / "config.json").write_text(json.dumps(cfg))
    from transformers import DiffusionGemmaForBlockDiffusion

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32, ignore_mismatched_sizes=True)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "vision" not in name or "inv_freq" in name:
                continue
            if name.endswith(("input_min", "output_min")):
                p.fill_(-1.5 - float(torch.rand((), generator=g)))
            elif name.endswith(("input_max", "output_max")):
                p.fill_(1.5 + float(torch.rand((), generator=g)))
            elif name.endswith("std_bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "position_embedding_table" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    model.save_pretrained(path)
    tok = HFTokenizer.from_str(build_tokenizer_json())
    tok.add_special_tokens(["<|image>", "<|image|>", "<image|>"])
    assert [tok.token_to_id(t) for t in ("<|image>", "<|image|>", "<image|>")] == [BOI, IMG, EOI]
    (path / "tokenizer.json").write_text(tok.to_str())
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                            "pad_token": "<pad>"}))
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def vision_ckpt(ckpt_dir):
    path = ckpt_dir / "vision"
    if not (path / "chat_template.jinja").exists():
        make_vision_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def vision_ckpt_gqa(ckpt_dir):
    """Two layers, grouped key/value heads, clipped linears and standardised output: every branch of the tower."""
    path = ckpt_dir / "vision_gqa"
    if not (path / "chat_template.jinja").exists():
        make_vision_checkpoint(path, seed=3, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               use_clipped_linears=True, standardize=True)
    return path


# -- images ------------------------------------------------------------------------------------------------------
def _noise(h, w, seed=0):
    """A smooth random picture (noise alone would make bicubic resizing trivially comparable)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / 7.0 + c) * np.cos(y / 11.0 - c) for c in range(3)], -1) * 100 + 128
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gallery():
    """(name, what dgemma is given, what the reference processor is given) for images of many sizes and modes."""
    rgba = np.concatenate([_noise(37, 900, 2), np.random.default_rng(3).integers(0, 256, (37, 900, 1), np.uint8)], -1)
    pal = Image.fromarray(_noise(300, 200, 4)).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 5
    frames = [Image.fromarray(_noise(120, 160, s)) for s in (5, 6)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    items = [
        ("rgb 480x640", Image.fromarray(_noise(480, 640))),
        ("greyscale 1000x30", Image.fromarray(_noise(1000, 30, 1)).convert("L")),
        ("rgba 37x900", Image.fromarray(rgba, "RGBA")),
        ("palette+transparency 300x200", pal),
        ("1-bit 50x70", Image.fromarray(_noise(50, 70, 7)).convert("1")),
        ("LA 64x64", Image.fromarray(_noise(64, 64, 8)).convert("LA")),
        ("cmyk jpeg 333x517", _encoded(Image.fromarray(_noise(333, 517, 9)).convert("CMYK"), "JPEG")),
        ("webp 240x100", _encoded(Image.fromarray(_noise(240, 100, 10)), "WEBP", quality=90)),
        ("gif first frame", gif.getvalue()),
        ("png 3000x2000 (downscale)", _encoded(Image.fromarray(_noise(2000, 3000, 11)), "PNG")),
        ("exact 768x768 (no resize)", Image.fromarray(_noise(768, 768, 12))),
        ("tiny 5x7", Image.fromarray(_noise(7, 5, 13))),
        ("numpy uint8 HxWx3", _noise(200, 333, 14)),
        ("numpy greyscale HxW", _noise(90, 45, 15)[..., 0]),
        ("numpy rgba", rgba[:, :400]),
    ]
    out = []
    for name, src in items:
        ref_input = open_image(src, name)  # decoded and upright; the processor takes it from there
        if isinstance(ref_input, np.ndarray) and ref_input.ndim == 2:
            ref_input = ref_input[..., None]  # the processor reads a bare [H, W] array as a batch of rows
        out.append((name, src, ref_input))
    return out


@pytest.mark.parametrize("max_soft_tokens", [280, 70])
@pytest.mark.slow
def test_preprocessing_matches_gemma4_image_processor(max_soft_tokens):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    ref = Gemma4ImageProcessorPil(max_soft_tokens=max_soft_tokens)
    settings = ImageSettings(max_soft_tokens=max_soft_tokens)
    gallery = _gallery()
    assert len(gallery) >= 10
    for name, src, ref_input in gallery:
        expect = ref(ref_input, return_tensors="np")
        mine = preprocess(src, settings, name)
        pixels, positions = mine.padded(settings.max_patches)
        assert np.array_equal(pixels, expect["pixel_values"][0]), name
        assert np.array_equal(positions, expect["image_position_ids"][0]), name
        assert mine.num_soft_tokens == expect["num_soft_tokens_per_image"][0], name


def test_settings_from_checkpoint_files(tmp_path):
    assert ImageSettings.from_folder(tmp_path) == ImageSettings()
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"image_processor": {"max_soft_tokens": 560, "patch_size": 16}, "image_seq_length": 560}))
    assert ImageSettings.from_folder(tmp_path).max_soft_tokens == 560
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_soft_tokens": 140, "do_normalize": True,
                                                                   "image_mean": [0.5] * 3, "image_std": 0.5}))
    s = ImageSettings.from_folder(tmp_path)  # processor_config.json's block is read last
    assert (s.max_soft_tokens, s.do_normalize, s.image_mean, s.image_std) == (560, True, (0.5,) * 3, (0.5,) * 3)
    (tmp_path / "processor_config.json").unlink()
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    s = ImageSettings.from_folder(tmp_path)
    ref = Gemma4ImageProcessorPil(max_soft_tokens=140, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    img = Image.fromarray(_noise(123, 456))
    assert np.array_equal(preprocess(img, s).padded(s.max_patches)[0], ref(img, return_tensors="np")["pixel_values"][0])


def test_exif_orientation_is_honoured(tmp_path):
    from transformers.image_utils import load_image
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    img = Image.fromarray(_noise(100, 300))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    upright = open_image(path)
    assert upright.size == (100, 300)  # width x height after the rotation
    mine = preprocess(path, ImageSettings())
    expect = Gemma4ImageProcessorPil()(load_image(str(path)), return_tensors="np")  # load_image applies EXIF too
    assert np.array_equal(mine.padded(2520)[0], expect["pixel_values"][0])
    assert mine.height > mine.width


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_bad_images_give_one_clear_error(tmp_path):
    s = ImageSettings()
    with pytest.raises(InputError, match="nope.png: image file not found"):
        preprocess(tmp_path / "nope.png", s)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(InputError, match="notes.txt: not a readable image"):
        preprocess(text, s)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(_encoded(Image.fromarray(_noise(64, 64)), "PNG")[:300])
    with pytest.raises(InputError, match="cut.png: not a readable image"):
        preprocess(truncated, s)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(30_000, 30_000))
    with pytest.raises(InputError, match="bomb.png: too large an image"):
        preprocess(bomb, s)
    with pytest.raises(InputError, match=r"image 2 \(bytes\): not a readable image"):
        preprocess(b"garbage", s, "image 2 (bytes)")
    with pytest.raises(InputError, match="remote image URLs are not fetched"):
        preprocess("https://example.com/cat.png", s)
    with pytest.raises(InputError, match="an image array must be"):
        preprocess(np.zeros((5, 5, 2), np.uint8), s)


def test_data_url_equals_bytes():
    import base64

    raw = _encoded(Image.fromarray(_noise(50, 80)), "PNG")
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    a, b = preprocess(url, ImageSettings()), preprocess(raw, ImageSettings())
    assert np.array_equal(a.patches, b.patches)


# -- the chat layout ---------------------------------------------------------------------------------------------
def test_chat_template_lays_out_image_tokens(vision_ckpt):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    ck = Checkpoint(vision_ckpt)
    tok, vision = ck.tokenizer(), VisionConfig.from_dict(ck.raw_config)
    a, b = Image.fromarray(_noise(100, 200)), _noise(300, 90, 1)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image", "image": a},
                                             {"type": "text", "text": "and"},
                                             {"type": "image_url", "image_url": {"url": b}}]}]
    prompt = encode_image_chat(tok, vision, ImageSettings(), messages)
    counts = Gemma4ImageProcessorPil()([a, b], return_tensors="np")["num_soft_tokens_per_image"]
    assert [im.num_soft_tokens for im in prompt.images] == list(counts)
    expect = tok.encode("<bos><start_of_turn>user\nCompare", add_special_tokens=False)
    expect += [BOI] + [IMG] * counts[0] + [EOI] + tok.encode("and", add_special_tokens=False)
    expect += [BOI] + [IMG] * counts[1] + [EOI] + tok.encode("<end_of_turn>\n<start_of_turn>model\n",
                                                             add_special_tokens=False)
    assert prompt.token_ids == expect
    blocks = image_block_ids(prompt.token_ids, IMG)
    assert set(blocks.tolist()) == {0, 1, 2} and (blocks == 1).sum() == counts[0] and (blocks == 2).sum() == counts[1]
    # Text-only messages still go through the ordinary chat path.
    plain = [{"role": "user", "content": "hi"}]
    assert encode_image_chat(tok, vision, ImageSettings(), plain).token_ids == tok.encode_chat(plain)
    assert split_images(plain) == (plain, [])


def test_chat_template_errors(vision_ckpt, tmp_path):
    ck = Checkpoint(vision_ckpt)
    tok, vision = ck.tokenizer(), VisionConfig.from_dict(ck.raw_config)
    img = {"type": "image", "image": _noise(40, 40)}
    tok.chat_template = TEMPLATE.replace("{{ '<|image|>' }}", "")  # a template that drops images
    with pytest.raises(InputError, match="1 image.* but the template placed 0 image token"):
        encode_image_chat(tok, vision, ImageSettings(), [{"role": "user", "content": [img]}])
    with pytest.raises(InputError, match="has no vision tower"):
        encode_image_chat(tok, None, ImageSettings(), [{"role": "user", "content": [img]}])
    with pytest.raises(InputError, match="missing.png: image file not found"):
        encode_image_chat(tok, vision, ImageSettings(),
                          [{"role": "user", "content": [{"type": "image", "url": str(tmp_path / "missing.png")}]}])
    with pytest.raises(InputError, match="needs the image"):
        encode_image_chat(tok, vision, ImageSettings(), [{"role": "user", "content": [{"type": "image"}]}])


# -- the tower on both backends ----------------------------------------------------------------------------------
def _reference_features(path, images, settings):
    """The reference's get_image_features on the images padded into one batch: (tower output, embedded)."""
    import torch
    from reference import load_reference

    model = load_reference(path)
    pixels, positions = zip(*(im.padded(settings.max_patches) for im in images))
    with torch.no_grad():
        out = model.model.encoder.get_image_features(torch.from_numpy(np.stack(pixels)),
                                                     torch.from_numpy(np.stack(positions)), return_dict=True)
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _images(settings):
    return [preprocess(Image.fromarray(_noise(h, w, s)), settings, f"{w}x{h}")
            for h, w, s in ((100, 200, 0), (480, 300, 1), (64, 64, 2))]


def _torch_tower(path):
    import torch

    from dgemma.backends.cuda.vision import load_vision_tower

    ck = Checkpoint(path)
    return load_vision_tower(ck, VisionConfig.from_dict(ck.raw_config), torch.device("cpu"), torch.float32)


def _mlx_tower(path):
    mx = pytest.importorskip("mlx.core")
    from dgemma.backends.mlx.vision import load_vision_tower

    ck = Checkpoint(path)
    return load_vision_tower(ck, VisionConfig.from_dict(ck.raw_config), mx.float32)


@pytest.mark.parametrize("which", ["vision_ckpt", "vision_ckpt_gqa"])
@pytest.mark.parametrize("backend", ["cuda", "mlx"])
@pytest.mark.slow
def test_image_features_match_reference(request, which, backend):
    path = request.getfixturevalue(which)
    settings = ImageSettings(max_soft_tokens=70)
    images = _images(settings)
    ref_features, ref_embedded = _reference_features(path, images, settings)
    if backend == "cuda":
        import torch

        tower = _torch_tower(path)
        with torch.no_grad():
            features = torch.cat([tower.features(im) for im in images]).numpy()
            embedded = tower(images).numpy()
    else:
        tower = _mlx_tower(path)
        import mlx.core as mx

        features = np.array(mx.concatenate([tower.features(im) for im in images]))
        embedded = np.array(tower(images))
    assert features.shape == ref_features.shape == (sum(im.num_soft_tokens for im in images), 32)
    assert rel(features, ref_features) < 1e-4
    assert rel(embedded, ref_embedded) < 1e-4


def _reference_merged(path, prompt, settings):
    """The reference encoder's input embeddings (text embeddings with the image features scattered in), caught on
    the way into its language model."""
    import torch
    from reference import load_reference

    model = load_reference(path)
    caught = {}

    def hook(module, args, kwargs):
        caught["embeds"] = kwargs["inputs_embeds"].clone()

    model.model.encoder.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    pixels, positions = zip(*(im.padded(settings.max_patches) for im in prompt.images))
    ids = torch.tensor([prompt.token_ids])
    with torch.no_grad():
        model.model.encoder(input_ids=ids, pixel_values=torch.from_numpy(np.stack(pixels)),
                            image_position_ids=torch.from_numpy(np.stack(positions)),
                            mm_token_type_ids=(ids == IMG).long())
    return caught["embeds"].numpy()


def _text_embeddings(ck, ids):
    """The encoder's token embeddings (embedding row x sqrt(hidden), in float32 here), from the checkpoint."""
    (_, table), = ck.iter_tensors("np", {"model.decoder.embed_tokens.weight"})
    return table[ids] * np.float32(ck.config.hidden_size**0.5)


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_merged_embeddings_match_reference(vision_ckpt, backend):
    ck = Checkpoint(vision_ckpt)
    settings = ImageSettings(max_soft_tokens=70)
    a, b = Image.fromarray(_noise(100, 200)), Image.fromarray(_noise(300, 90, 1))
    messages = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "vs"},
                                             {"type": "image", "image": b}]}]
    prompt = encode_image_chat(ck.tokenizer(), VisionConfig.from_dict(ck.raw_config), settings, messages)
    expect = _reference_merged(vision_ckpt, prompt, settings)
    ids = np.array([prompt.token_ids])
    text = _text_embeddings(ck, ids)
    if backend == "cuda":
        import torch

        from dgemma.backends.cuda.vision import merge_image_embeddings

        tower = _torch_tower(vision_ckpt)
        with torch.no_grad():
            merged = merge_image_embeddings(torch.from_numpy(text), torch.from_numpy(ids), IMG,
                                            tower(prompt.images)).numpy()
    else:
        import mlx.core as mx

        from dgemma.backends.mlx.vision import merge_image_embeddings

        tower = _mlx_tower(vision_ckpt)
        merged = np.array(merge_image_embeddings(mx.array(text), ids, IMG, tower(prompt.images)))
    assert merged.shape == expect.shape
    assert rel(merged, expect) < 1e-4
    assert not np.array_equal(merged, text)  # the images did land


# -- prefill and generation with images, end to end ----------------------------------------------------------------
def _write_processor_config(path: Path, max_soft_tokens: int = 70) -> None:
    (path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "Gemma4ImageProcessor",
                                                               "max_soft_tokens": max_soft_tokens}))


def _image_messages(n_images: int, seed: int, text: str = "what is this?"):
    sizes = [(100, 200), (300, 90), (64, 64)]
    parts = [{"type": "image", "image": Image.fromarray(_noise(*sizes[(seed + k) % 3], seed + k))}
             for k in range(n_images)]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def _left_pad_inputs(encoded, inputs):
    """ids, mask (torch), embeds [B, T, H] and blocks [B, T] left-padded as the engine pads them."""
    import torch
    from reference import padded

    ids, mask = padded([e.token_ids for e in encoded])
    T = ids.shape[1]
    H = inputs[0]["input_embeds"].shape[-1]
    embeds = np.zeros((len(encoded), T, H), np.float32)
    blocks = np.zeros((len(encoded), T), np.int64)
    for i, x in enumerate(inputs):
        n = len(x["image_blocks"])
        embeds[i, T - n:], blocks[i, T - n:] = x["input_embeds"], x["image_blocks"]
    return ids, mask, embeds, blocks


def _reference_prefill(oracle, ids, mask, images, settings):
    """The reference's prefill with images, as its generate() runs it: the encoder mask built from
    mm_token_type_ids (image tokens attend to their own image both ways), pixel values of every image in row
    order."""
    import torch
    from transformers import DynamicCache

    model = oracle.model
    oracle.cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    oracle.mask, oracle.len = mask, ids.shape[1]
    pos = torch.arange(ids.shape[1])[None]
    mm = (ids == IMG).long()
    mapping = model.model.encoder.create_masks_for_generate(
        config=model.config, inputs_embeds=torch.empty((ids.shape[0], ids.shape[1], 0)), attention_mask=mask,
        past_key_values=oracle.cache, position_ids=pos, mm_token_type_ids=mm)
    kw = {}
    if images:
        pixels, positions = zip(*(im.padded(settings.max_patches) for im in images))
        kw = dict(pixel_values=torch.from_numpy(np.stack(pixels)),
                  image_position_ids=torch.from_numpy(np.stack(positions)))
    with torch.no_grad():
        model.model.encoder(input_ids=ids, attention_mask=mapping, past_key_values=oracle.cache, position_ids=pos,
                            mm_token_type_ids=mm, **kw)


def _check_cache(oracle, state):
    import torch

    for i, layer in enumerate(oracle.cache.layers):
        L = state.keys[i].shape[2]
        assert layer.keys.shape[2] == L, f"layer {i}: cache length {L} vs reference {layer.keys.shape[2]}"
        real = np.asarray(state.valid)[:, -L:]
        for name, ours, theirs in (("keys", state.keys[i], layer.keys), ("values", state.values[i], layer.values)):
            ours = (ours.float().numpy() if isinstance(ours, torch.Tensor) else np.array(ours)).astype(np.float32)
            diff = np.abs(ours - theirs.numpy()).max(axis=(1, 3))  # [B, L]
            assert diff[real].max() <= 1e-4 * theirs.abs().max().item(), f"layer {i} {name}"


@pytest.fixture(scope="module")
def vision_model_ckpt(vision_ckpt):
    _write_processor_config(vision_ckpt)
    return vision_ckpt


@pytest.mark.parametrize("backend, chunk", [("cuda", None), ("mlx", None), ("cuda", 50), ("mlx", 50)])
@pytest.mark.slow
def test_prefill_and_denoise_with_images_match_reference(vision_model_ckpt, backend, chunk):
    """A padded batch of three: two images, one image, text only. K/V of every layer after the prefill and after
    a commit, and denoise logits (with and without self-conditioning), within 1e-4 of the reference. With prefill
    chunks of 50 tokens a chunk boundary falls inside an image (the chunk then runs on to the image's end)."""
    import torch
    from reference import Oracle

    import dgemma

    if backend == "mlx":
        pytest.importorskip("mlx.core")
    model = dgemma.load(vision_model_ckpt, backend=backend, dtype="float32")
    if chunk is not None:
        model.backend.prefill_chunk = chunk
    prompts = [_image_messages(2, 0), _image_messages(1, 1, "and this one?"), [{"role": "user", "content": "hi"}]]
    encoded = [model._encode_images(p, None) for p in prompts]
    inputs = model._images().request_inputs(model.backend, encoded)
    ids, mask, embeds, blocks = _left_pad_inputs(encoded, inputs)
    assert ids.shape[1] > 2 * 8 and (blocks > 0).sum() > 70  # images longer than the sliding window (8)
    if chunk is not None:
        starts = [a for a, _ in model.backend.prefill_chunks(ids.shape[1], blocks)]
        assert len(starts) > 1 and all(not ((blocks[:, a] > 0) & (blocks[:, a] == blocks[:, a - 1])).any()
                                       for a in starts[1:])  # no chunk starts inside an image
        assert any(b - a > chunk for a, b in model.backend.prefill_chunks(ids.shape[1], blocks))
    state = model.backend.prefill(ids.numpy(), mask.numpy(), input_embeds=embeds, image_blocks=blocks)
    oracle = Oracle(vision_model_ckpt)
    settings = model._images().settings
    _reference_prefill(oracle, ids, mask, [im for e in encoded for im in e.images], settings)
    _check_cache(oracle, state)
    g = torch.Generator().manual_seed(0)
    V, C = model.config.vocab_size, model.config.canvas_length
    for block in range(2):
        canvas = torch.randint(0, V, (3, C), generator=g)
        ref = oracle.denoise(canvas)
        ours = np.asarray(model.denoise(state, canvas.numpy()))
        assert rel(ours, ref.numpy()) < 1e-4, f"denoise, block {block}"
        sc = ref / 0.7
        assert rel(np.asarray(model.denoise(state, canvas.numpy(), sc.numpy())),
                   oracle.denoise(canvas, sc).numpy()) < 1e-4
        model.commit(state, canvas.numpy())
        oracle.commit(canvas)
        _check_cache(oracle, state)


def _reference_generate(path, encoded, settings, seeds, **kw):
    import torch
    from reference import injected_noise, load_reference, padded

    ref = load_reference(path)
    ids, mask = padded([e.token_ids for e in encoded])
    images = [im for e in encoded for im in e.images]
    pixels, positions = zip(*(im.padded(settings.max_patches) for im in images))
    with injected_noise(seeds, ref.config.text_config.vocab_size, ref.config.canvas_length):
        out = ref.generate(ids, attention_mask=mask, pixel_values=torch.from_numpy(np.stack(pixels)),
                           image_position_ids=torch.from_numpy(np.stack(positions)),
                           mm_token_type_ids=(ids == IMG).long(), **kw)
    return out, ids.shape[1]


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
@pytest.mark.slow
def test_generation_with_images_equals_reference_tokens(vision_model_ckpt, backend):
    """Injected noise, a padded batch with one and with two images and a text-only row: the reference's tokens."""
    import dgemma
    from dgemma.sampler import ScriptedNoise

    if backend == "mlx":
        pytest.importorskip("mlx.core")
    model = dgemma.load(vision_model_ckpt, backend=backend, dtype="float32")
    prompts = [_image_messages(1, 0), _image_messages(2, 1, "compare them"), [{"role": "user", "content": "hi"}]]
    seeds = [21, 22, 23]
    kw = dict(max_new_tokens=32, max_denoising_steps=6, eos_token_ids=[1], pad_token_id=0)
    res = model.generate_batch(prompts, noises=[ScriptedNoise(s, model.backend.ops) for s in seeds], **kw)
    encoded = [model._encode_images(p, None) for p in prompts]
    out, T = _reference_generate(vision_model_ckpt, encoded, model._images().settings, seeds, max_new_tokens=32,
                                 max_denoising_steps=6, eos_token_id=[1], pad_token_id=0)
    for i in range(3):
        assert res[i].raw_token_ids == out.sequences[i, T:].tolist(), f"row {i}"
        assert res[i].stats.prompt_tokens == len(encoded[i].token_ids)


def test_same_text_different_images_in_one_batch(vision_model_ckpt):
    """Two prompts whose token ids are equal (same text, same-sized images) but whose images differ are two rows."""
    import dgemma
    from dgemma.sampler import ScriptedNoise

    model = dgemma.load(vision_model_ckpt, backend="cuda", dtype="float32")
    a = [{"role": "user", "content": [{"type": "image", "image": _noise(100, 200, 0)}, {"type": "text", "text": "?"}]}]
    b = [{"role": "user", "content": [{"type": "image", "image": _noise(100, 200, 9)}, {"type": "text", "text": "?"}]}]
    kw = dict(max_new_tokens=16, max_denoising_steps=4, eos_token_ids=[1], pad_token_id=0)
    both = model.generate_batch([a, b], noises=[ScriptedNoise(5, model.backend.ops)] * 2, **kw)
    alone = model.generate_batch([b], noises=[ScriptedNoise(5, model.backend.ops)], **kw)
    assert both[1].raw_token_ids == alone[0].raw_token_ids


def test_image_errors_through_the_api(vision_model_ckpt, tiny_ckpt, tmp_path):
    import dgemma

    model = dgemma.load(vision_model_ckpt, backend="cuda", dtype="float32")
    with pytest.raises(InputError, match="nope.png: image file not found"):
        model.generate([{"role": "user", "content": [{"type": "image", "url": str(tmp_path / "nope.png")}]}],
                       max_new_tokens=16)
    text = tmp_path / "a.txt"
    text.write_text("hello")
    with pytest.raises(InputError, match="a.txt: not a readable image"):
        model.generate([{"role": "user", "content": [{"type": "image", "path": str(text)}]}], max_new_tokens=16)
    two = [{"role": "user", "content": [{"type": "image", "image": _noise(40, 40)}, {"type": "text", "text": "x"}]}]
    model.tokenizer.chat_template = TEMPLATE.replace("{{ '<|image|>' }}", "")
    with pytest.raises(InputError, match="the template placed 0 image token"):
        model.generate(two, max_new_tokens=16)
    textonly = tmp_path / "textonly"
    import shutil

    shutil.copytree(vision_model_ckpt, textonly)
    cfg = json.loads((textonly / "config.json").read_text())
    cfg.pop("vision_config")
    (textonly / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="has no vision tower"):
        dgemma.load(textonly, backend="cuda").generate(two, max_new_tokens=16)


# -- the CLI -----------------------------------------------------------------------------------------------------
def _cli(*args):
    from click.testing import CliRunner

    from dgemma.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_cli_generate_with_images(vision_model_ckpt, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.fromarray(_noise(100, 200)).save(a)
    Image.fromarray(_noise(300, 90, 1)).save(b)
    common = ["generate", "--model", str(vision_model_ckpt), "--max-new-tokens", "16", "--steps", "3", "--seed", "1"]
    ok = _cli(*common, "--chat", "--image", str(a), "--image", str(b), "-p", "compare", "-p", "again", "--json")
    assert ok.exit_code == 0, ok.output
    rows = [json.loads(line) for line in ok.stdout.splitlines()]
    settings = ImageSettings.from_folder(vision_model_ckpt)
    soft = sum(preprocess(p, settings).num_soft_tokens for p in (a, b))
    assert len(rows) == 2 and rows[0]["prompt_tokens"] - rows[1]["prompt_tokens"] == len("compare") - len("again")
    assert rows[1]["prompt_tokens"] > soft + 4  # both images' soft tokens and their boi/eoi are in the prompt
    _one_line_error(_cli(*common, "--image", str(a), "-p", "x"), "--image needs --chat")
    _one_line_error(_cli(*common, "--chat", "--image", str(tmp_path / "none.png"), "-p", "x"),
                    "--image", "none.png: file not found")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png at all")
    _one_line_error(_cli(*common, "--chat", "--image", str(junk), "-p", "x"), "junk.png: not a readable image")
    _one_line_error(_cli("generate", "--chat", "--image", str(a), "-p", "x", "--max-new-tokens", "16"))  # no tower


@pytest.mark.slow
def test_mlx_loads_a_quantized_vision_tower(vision_ckpt, tmp_path):
    """A conversion that quantized the tower's linears (mlx-vlm does, at its default predicate) loads quantized in
    MLX, equal to quantizing the float tower in memory; the PyTorch backend, which runs the tower unquantized, says
    so in one error."""
    mx = pytest.importorskip("mlx.core")
    import shutil

    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from dgemma.backends.mlx.vision import load_vision_tower
    from dgemma.errors import CheckpointError

    ck = Checkpoint(vision_ckpt)
    vision = VisionConfig.from_dict(ck.raw_config)
    tower = _mlx_tower(vision_ckpt)
    nn.quantize(tower, group_size=32, bits=8, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    out = tmp_path / "quantized"
    shutil.copytree(vision_ckpt, out)
    tensors = {k: v for k, v in mx.load(str(vision_ckpt / "model.safetensors")).items() if "vision" not in k}
    for name, t in tree_flatten(tower.parameters()):
        hf = ("model.encoder.embed_vision." + name[len("embedder."):] if name.startswith("embedder.")
              else "model.encoder.vision_tower." + ("encoder." + name if name.startswith("layers.") else name))
        tensors[hf] = t
    mx.save_safetensors(str(out / "model.safetensors"), tensors, metadata={"format": "mlx"})
    loaded = load_vision_tower(Checkpoint(out), vision, mx.float32)
    assert isinstance(loaded.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    settings = ImageSettings(max_soft_tokens=70)
    images = _images(settings)
    assert np.array_equal(np.array(loaded(images)), np.array(tower(images)))
    _, ref_embedded = _reference_features(vision_ckpt, images, settings)
    assert rel(np.array(loaded(images)), ref_embedded) < 0.05  # 8-bit rounding, not a wiring error
    with pytest.raises(CheckpointError, match="unexpected vision tensor"):
        _torch_tower(out)


def test_encode_with_images_feeds_an_engine_request(vision_model_ckpt):
    """What a server does with one chat request: encode_with_images, then an engine Request with those fields; the
    tokens equal generate()'s."""
    import dgemma
    from dgemma.engine import Engine, Request
    from dgemma.sampler import ScriptedNoise

    model = dgemma.load(vision_model_ckpt, backend="cuda", dtype="float32")
    messages = _image_messages(1, 2, "describe")
    ids, fields = model.encode_with_images(messages)
    assert set(fields) == {"input_embeds", "image_blocks"} and len(fields["image_blocks"]) == len(ids)
    assert model.encode_with_images([{"role": "user", "content": "hi"}])[1] == {}
    settings = model.settings(max_new_tokens=16, max_denoising_steps=3)
    engine = Engine(model.backend)
    handle = engine.submit(Request(ids, settings, noise=ScriptedNoise(4, model.backend.ops), **fields))
    list(engine.run([handle]))
    direct = model.generate(messages, noise=ScriptedNoise(4, model.backend.ops), max_new_tokens=16,
                            max_denoising_steps=3)
    assert handle.result.raw_token_ids == direct.raw_token_ids


@pytest.mark.parametrize("backend, kw", [("mlx", dict(to="mlx", bits=4, group_size=32)),
                                         ("cuda", dict(to="cuda", quant="fp8"))])
def test_quantized_conversions_take_images(vision_model_ckpt, tmp_path, backend, kw):
    """dgemma convert carries the vision tower unquantized into a quantized checkpoint, which then takes images:
    the image tokens' soft embeddings equal the source checkpoint's, and it generates."""
    import dgemma
    from dgemma.convert import convert

    if backend == "mlx":
        pytest.importorskip("mlx.core")
    out = tmp_path / "converted"
    convert(vision_model_ckpt, out, progress=False, **kw)
    messages = _image_messages(1, 0)
    source = dgemma.load(vision_model_ckpt, backend=backend, dtype="float32")
    quantized = dgemma.load(out, backend=backend, dtype="float32")
    ids, fields = quantized.encode_with_images(messages)
    ids_src, fields_src = source.encode_with_images(messages)
    image = np.asarray(ids) == IMG
    assert ids == ids_src and image.sum() > 0
    assert rel(fields["input_embeds"][image], fields_src["input_embeds"][image]) < 1e-6
    res = quantized.generate(messages, seed=0, max_new_tokens=16, max_denoising_steps=3)
    assert res.stats.prompt_tokens == len(ids) and len(res.raw_token_ids) == 16


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
@pytest.mark.slow
def test_bf16_tower_is_as_close_as_the_reference_bf16(vision_ckpt_gqa, backend):
    """In bfloat16 (the released checkpoint's dtype) the tower's output is as close to the exact float32 result as
    the reference's own bfloat16 run is."""
    import torch
    from reference import load_reference

    settings = ImageSettings(max_soft_tokens=70)
    images = _images(settings)
    padded = [im.padded(settings.max_patches) for im in images]
    pixels, positions = (torch.from_numpy(np.stack(x)) for x in zip(*padded))
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_reference(vision_ckpt_gqa, dtype=dtype)
        with torch.no_grad():
            out[dtype] = model.model.encoder.get_image_features(pixels, positions).pooler_output.float().numpy()
    exact, ref_error = out[torch.float32], rel(out[torch.bfloat16], out[torch.float32])
    ck = Checkpoint(vision_ckpt_gqa)
    vision = VisionConfig.from_dict(ck.raw_config)
    if backend == "cuda":
        from dgemma.backends.cuda.vision import load_vision_tower

        with torch.no_grad():
            ours = load_vision_tower(ck, vision, torch.device("cpu"), torch.bfloat16)(images).float().numpy()
    else:
        mx = pytest.importorskip("mlx.core")
        from dgemma.backends.mlx.vision import load_vision_tower

        ours = np.array(load_vision_tower(ck, vision, mx.bfloat16)(images).astype(mx.float32))
    assert 0 < ref_error < 0.1
    assert rel(ours, exact) <= 1.25 * ref_error + 1e-3


def test_follow_up_turn_reuses_the_image_prefix(vision_model_ckpt):
    """A follow-up turn resends the conversation with its image: the tower does not run on that image again and the
    prompt cache reuses the prefix's keys/values (the image's positions included); the answer equals a cold run."""
    import dgemma
    from dgemma.engine import Engine, PromptCache, Request
    from dgemma.sampler import ScriptedNoise

    model = dgemma.load(vision_model_ckpt, backend="cuda", dtype="float32")
    model.backend.prefill_chunk = 8  # whole chunks inside a short prompt
    first = _image_messages(1, 2, "describe")
    follow = first + [{"role": "assistant", "content": "a picture"}, {"role": "user", "content": "more, please"}]
    settings = model.settings(max_new_tokens=16, max_denoising_steps=3)
    warm = Engine(model.backend, prompt_cache=PromptCache(1 << 26))
    for messages in (first, follow):
        ids, fields = model.encode_with_images(messages)
        handle = warm.submit(Request(ids, settings, noise=ScriptedNoise(4, model.backend.ops), **fields))
        list(warm.run([handle]))
    tower = model.backend._tower_cache
    assert tower.hits >= 1, "the image was run through the tower twice"
    assert handle.result.cached_tokens > 0
    cold = Engine(model.backend)
    ids, fields = model.encode_with_images(follow)
    again = cold.submit(Request(ids, settings, noise=ScriptedNoise(4, model.backend.ops), **fields))
    list(cold.run([again]))
    assert handle.result.raw_token_ids == again.result.raw_token_ids
