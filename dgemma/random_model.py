"""A small random DiffusionGemma checkpoint written with numpy alone (no torch, no mlx), in exactly the layout
transformers' save_pretrained writes. It is the default model until a trained one ships with the package, and the
fixture the CLI tests run on. Its output is noise: it proves the pipeline, not the model."""

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
    rng = np.random.default_rng(seed)
    H, V, I = text["hidden_size"], text["vocab_size"], text["intermediate_size"]
    E, MI = text["num_experts"], text["moe_intermediate_size"]
    nq = text["num_attention_heads"]

    def lin(o, i):
        return (rng.standard_normal((o, i)) / np.sqrt(i)).astype(dtype)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(dtype)

    w = {"model.decoder.embed_tokens.weight": rng.standard_normal((V, H)).astype(dtype) * 0.5,
         "model.decoder.norm.weight": norm(H)}
    sc = "model.decoder.self_conditioning."
    w.update({sc + "pre_norm.weight": norm(H), sc + "gate_proj.weight": lin(I, H), sc + "up_proj.weight": lin(I, H),
              sc + "down_proj.weight": lin(H, I)})
    per_layer = text.get("per_layer_config", {})
    for i, kind in enumerate(text["layer_types"]):
        p = f"model.decoder.layers.{i}."
        over = per_layer.get(str(i), {})
        d = over.get("head_dim", text["head_dim"])
        nkv = over.get("num_key_value_heads", text["num_key_value_heads"])
        w.update({p + "self_attn.q_proj.weight": lin(nq * d, H), p + "self_attn.k_proj.weight": lin(nkv * d, H),
                  p + "self_attn.o_proj.weight": lin(H, nq * d), p + "self_attn.q_norm.weight": norm(d),
                  p + "self_attn.k_norm.weight": norm(d), p + "mlp.gate_proj.weight": lin(I, H),
                  p + "mlp.up_proj.weight": lin(I, H), p + "mlp.down_proj.weight": lin(H, I),
                  p + "router.proj.weight": lin(E, H), p + "router.scale": norm(H), p + "router.per_expert_scale": norm(E),
                  p + "experts.gate_up_proj": (rng.standard_normal((E, 2 * MI, H)) / np.sqrt(H)).astype(dtype),
                  p + "experts.down_proj": (rng.standard_normal((E, H, MI)) / np.sqrt(MI)).astype(dtype),
                  p + "layer_scalar": np.ones(1, dtype=dtype)})
        if kind == "sliding_attention":
            w[p + "self_attn.v_proj.weight"] = lin(nkv * d, H)
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
                  "pre_feedforward_layernorm_2"):
            w[p + n + ".weight"] = norm(H)
        w[f"model.encoder.language_model.layers.{i}.layer_scalar"] = np.ones(1, dtype=dtype)
    return w


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
