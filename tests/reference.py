"""Test helpers: random checkpoints written by transformers' save_pretrained, and the reference implementation
(transformers' DiffusionGemmaForBlockDiffusion) driven with the same injected noise as dgemma."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from dgemma.sampler import ScriptedNoise

TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, sliding_window=8,
            num_experts=8, top_k_experts=2, moe_intermediate_size=32, max_position_embeddings=2048)


def make_checkpoint(path: Path, canvas_length: int = 16, seed: int = 0, dtype=torch.float32, scale: float = 1.0,
                    eos_token_id=(1,), **text_overrides) -> Path:
    """Write a random DiffusionGemma with every parameter randomised (norm weights, router scales, layer scalars
    included, encoder and decoder layer scalars different) so that a wrong wiring shows in the logits."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = dict(TINY, **text_overrides)
    cfg = DiffusionGemmaConfig(
        text_config=text,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16),
        canvas_length=canvas_length, eos_token_id=list(eos_token_id), pad_token_id=0)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "vision" in name or "inv_freq" in name or "embed_scale" in name:
                continue
            if name.endswith("layer_scalar"):
                p.copy_(0.7 + 0.6 * torch.rand(p.shape, generator=g))
            elif p.ndim == 1:  # norm weights, router scale, per-expert scale
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    model = model.to(dtype)
    model.save_pretrained(path)
    return Path(path)


def load_reference(path, dtype=torch.float32):
    from transformers import DiffusionGemmaForBlockDiffusion

    m = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=dtype)
    return m.eval()


@contextlib.contextmanager
def injected_noise(seeds, vocab_size: int, canvas_length: int):
    """Patch the reference sampler so that its canvas noise and categorical draws come from ScriptedNoise(seed_r),
    keyed by (block, step) exactly as dgemma's scheduler asks for them."""
    from transformers.models.diffusion_gemma import generation_diffusion_gemma as gen

    noises = [ScriptedNoise(s) for s in seeds]
    counter = {"block": -1, "step": 0}
    orig_prepare = gen.DiffusionGemmaGenerationMixin._prepare_denoiser_inputs
    orig_multinomial = torch.multinomial
    orig_init = gen.EntropyBoundSampler.initialize_canvas

    def prepare(self, *a, **k):
        counter["block"] += 1
        counter["step"] = 0
        return orig_prepare(self, *a, **k)

    def init_canvas(self, batch_size, device):
        b, s = counter["block"], counter["step"]
        rows = [nz.tokens_np(b, s, canvas_length, vocab_size) for nz in noises]
        return torch.as_tensor(np.stack(rows), device=device)

    def multinomial(probs, num_samples=1, **kw):
        counter["step"] += 1
        b, s = counter["block"], counter["step"]
        u = torch.as_tensor(np.concatenate([nz.uniforms_np(b, s, canvas_length) for nz in noises]))
        cdf = torch.cumsum(probs, dim=-1)
        idx = torch.searchsorted(cdf.contiguous(), (u * cdf[:, -1]).unsqueeze(-1).contiguous())
        return idx.clamp_(max=probs.shape[-1] - 1)

    gen.DiffusionGemmaGenerationMixin._prepare_denoiser_inputs = prepare
    gen.EntropyBoundSampler.initialize_canvas = init_canvas
    torch.multinomial = multinomial
    try:
        yield
    finally:
        gen.DiffusionGemmaGenerationMixin._prepare_denoiser_inputs = orig_prepare
        torch.multinomial = orig_multinomial
        gen.EntropyBoundSampler.initialize_canvas = orig_init


def padded(prompts, pad=0):
    """Left-pad token-id prompts into [B, T] ids and a boolean attention mask."""
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = True
    return ids, mask


class Oracle:
    """The reference's encoder and decoder passes, called the way its generate() calls them."""

    def __init__(self, path, dtype=torch.float32):
        self.model = load_reference(path, dtype)
        self.C = self.model.config.canvas_length

    def prefill(self, ids, mask):
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        self.mask, self.len = mask, ids.shape[1]
        with torch.no_grad():
            self.model.model.encoder(input_ids=ids, attention_mask=mask, past_key_values=self.cache,
                                     position_ids=torch.arange(self.len)[None])

    def denoise(self, canvas, sc=None):
        dmask = torch.nn.functional.pad(self.mask, (0, self.C), value=True)
        with torch.no_grad():
            return self.model(decoder_input_ids=canvas, past_key_values=self.cache, self_conditioning_logits=sc,
                              decoder_attention_mask=dmask,
                              decoder_position_ids=torch.arange(self.len, self.len + self.C)[None]).logits

    def commit(self, canvas):
        self.mask = torch.nn.functional.pad(self.mask, (0, self.C), value=True)
        with torch.no_grad():
            self.model.model.encoder(input_ids=canvas, attention_mask=self.mask, past_key_values=self.cache,
                                     position_ids=torch.arange(self.len, self.len + self.C)[None])
        self.len += self.C
