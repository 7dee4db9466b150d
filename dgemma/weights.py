"""The text tensors of a DiffusionGemma checkpoint, by their Hugging Face names, with the shapes the config implies.

One list for every part of dgemma that needs it: the backends check loaded shapes against it, the converter plans its
output from it, and the random default model is generated from it."""

from __future__ import annotations

from .config import ModelConfig

DECODER = "model.decoder."
ENCODER_LAYERS = "model.encoder.language_model.layers."
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
               "post_feedforward_layernorm_1", "post_feedforward_layernorm_2", "pre_feedforward_layernorm_2")


def text_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every text tensor save_pretrained writes (the LM head is tied and not stored), name -> shape. The encoder's
    per-layer `layer_scalar` is a buffer, so it is stored beside the decoder's (checkpoints may omit it)."""
    H, V, I = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    E, MI = cfg.num_experts, cfg.moe_intermediate_size
    d = DECODER
    out = {d + "embed_tokens.weight": (V, H), d + "norm.weight": (H,), d + "self_conditioning.pre_norm.weight": (H,),
           d + "self_conditioning.gate_proj.weight": (I, H), d + "self_conditioning.up_proj.weight": (I, H),
           d + "self_conditioning.down_proj.weight": (H, I)}
    for i, spec in enumerate(cfg.layers):
        p, hd, nq, nkv = f"{d}layers.{i}.", spec.head_dim, cfg.num_attention_heads, spec.num_kv_heads
        out.update({
            p + "self_attn.q_proj.weight": (nq * hd, H), p + "self_attn.k_proj.weight": (nkv * hd, H),
            p + "self_attn.o_proj.weight": (H, nq * hd), p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,), p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I), p + "router.proj.weight": (E, H), p + "router.scale": (H,),
            p + "router.per_expert_scale": (E,), p + "experts.gate_up_proj": (E, 2 * MI, H),
            p + "experts.down_proj": (E, H, MI), p + "layer_scalar": (1,),
        })
        if spec.sliding:  # full-attention layers have no v_proj (values are the keys before norm and RoPE)
            out[p + "self_attn.v_proj.weight"] = (nkv * hd, H)
        for n in LAYER_NORMS:
            out[p + n + ".weight"] = (H,)
        out[f"{ENCODER_LAYERS}{i}.layer_scalar"] = (1,)
    return out


def is_optional(name: str) -> bool:
    """Tensors a checkpoint may omit: the encoder's layer scalars (the decoder's value is used then)."""
    return name.startswith(ENCODER_LAYERS) and name.endswith(".layer_scalar")


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_weights(where, have: dict, want: dict, *, optional=lambda name: False, unknown_ok: bool = False,
                  label=lambda name: name) -> None:
    """The load-time check every backend makes, written once: `have` and `want` map a backend's own tensor names to
    shapes (what the checkpoint holds, after the backend's `sanitize`; what the config implies). Raises
    CheckpointError naming `where` for a tensor of the wrong shape, tensors the model lacks (unless `optional`) and,
    unless `unknown_ok`, tensors it does not know. `label(name)` is how a name is shown (e.g. its file and HF name)."""
    from .errors import CheckpointError

    for name, shape in have.items():
        if name in want and tuple(shape) != tuple(want[name]):
            raise CheckpointError(f"{label(name)} has shape {tuple(shape)}, the config implies {tuple(want[name])}")
    if not unknown_ok:
        unknown = sorted(set(have) - set(want))
        if unknown:
            raise CheckpointError(f"{where}: unexpected tensor(s) {_names(unknown)}")
    missing = sorted(n for n in set(want) - set(have) if not optional(n))
    if missing:
        raise CheckpointError(f"{where}: checkpoint lacks tensor(s) {_names(missing)}")
