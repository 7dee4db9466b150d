"""A small random DiffusionGemma checkpoint written with numpy alone (no torch, no mlx), in exactly the layout
transformers' save_pretrained writes: the fixture the CLI tests run on, the default model when the package ships none,
and a model to try every command on (`dgemma random-checkpoint DIR`). Its output is noise: it proves the pipeline, not
the model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<mask>", "<reserved>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n{{ message['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def tiny_text_config(vocab_size: int = 320) -> dict:
    return {
        "model_type": "diffusion_gemma_text", "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
        "per_layer_config": {"5": {"head_dim": 32, "num_key_value_heads": 1}},
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        },
        "sliding_window": 32, "rms_norm_eps": 1e-6, "num_experts": 8, "top_k_experts": 2,
        "moe_intermediate_size": 32, "max_position_embeddings": 4096, "hidden_activation": "gelu_pytorch_tanh",
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True,
        "use_bidirectional_attention": None, "attention_bias": False, "attention_dropout": 0.0,
    }


def build_tokenizer_json() -> str:
    """A byte-level BPE tokenizer with no merges: every byte is a token, so any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tok.to_str()


def random_weights(text: dict, seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """Weights for every tensor of `text_tensor_shapes`: linear layers ~ N(0, 1/fan_in), norm weights and scales
    near 1, layer scalars 1, embeddings ~ N(0, 0.25)."""
    from .config import ModelConfig
    from .weights import text_tensor_shapes

    cfg = ModelConfig.from_dict({"model_type": "diffusion_gemma", "text_config": text})
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in text_tensor_shapes(cfg).items():
        if name.endswith("layer_scalar"):
            w = np.ones(shape)
        elif len(shape) == 1:
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("embed_tokens.weight"):
            w = 0.5 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        out[name] = w.astype(dtype)
    return out


def write_random_checkpoint(path: str | os.PathLike, seed: int = 0, canvas_length: int = 32) -> Path:
    """Write the checkpoint into a temporary folder beside `path`, then move it into place (never half-written)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
    try:
        text = tiny_text_config()
        config = {"architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
                  "canvas_length": canvas_length, "dtype": "float32", "eos_token_id": [1], "pad_token_id": 0,
                  "tie_word_embeddings": True, "text_config": text, "_dgemma_note": "random weights (dgemma)"}
        gen = {"max_denoising_steps": 16, "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
               "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1, "confidence_threshold": 0.005,
               "eos_token_id": [1], "pad_token_id": 0, "max_new_tokens": 64}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        save_file(random_weights(text, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "tokenizer.json").write_text(build_tokenizer_json())
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2))
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
