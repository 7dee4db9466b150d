"""Benchmark: dgemma's MLX backend against mlx-vlm's diffusion_gemma on the same random weights, in one run.

    python bench/bench_mlx.py [--hidden 256 --vocab 8192 --canvas 64 --layers 4 --steps 16 --new 128 --dtype float32]

Prints, for both: one denoising step (decoder pass + logits, evaluated) and one whole generation, their ratio, and
whether the two produce the same logits for the same cache and canvas (and how far each is from transformers'
reference when transformers is installed). For dgemma also the same timings with its decoder pass uncompiled (the
core's op-by-op pass: the before/after of mx.compile in one run) and how many times the compiled pass was traced.
Needs mlx, mlx-vlm and transformers (to write the random checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def timeit(fn, reps: int) -> float:
    fn()  # warm-up (compiles, allocations)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


class _Detok:
    """The streaming-detokenizer surface mlx-vlm's generator touches (no real tokenizer for a random model)."""

    last_segment = ""

    def reset(self):
        pass

    def add_token(self, token, skip_special_token_ids=None):
        pass

    def finalize(self):
        pass


class _Stop:
    def __init__(self, eos):
        self.eos = set(eos)

    def add_eos_token_ids(self, ids):
        self.eos |= set(ids if isinstance(ids, (list, tuple)) else [ids])

    def __call__(self, token):
        return token in self.eos


class FakeTokenizer:
    def __init__(self, eos):
        self.detokenizer = _Detok()
        self.stopping_criteria = _Stop(eos)


@contextlib.contextmanager
def uncompiled_pass(model):
    """dgemma's decoder pass as the core writes it (dgemma.passes.CachePasses.decode_rows, op by op), for the
    before/after of the compiled pass in one run."""
    from dgemma.passes import CachePasses

    model.decode_rows = functools.partial(CachePasses.decode_rows, model)
    try:
        yield
    finally:
        del model.decode_rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--canvas", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=48)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    import mlx.core as mx
    import torch
    from reference import make_checkpoint

    import dgemma

    tmp = Path(tempfile.mkdtemp(prefix="bench_mlx_"))
    H = args.hidden
    path = make_checkpoint(
        tmp / "ck", canvas_length=args.canvas, scale=0.5, eos_token_id=(1,),
        vocab_size=args.vocab, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=H // 4, global_head_dim=H // 2,
        num_global_key_value_heads=1, sliding_window=32, num_experts=16, top_k_experts=4,
        moe_intermediate_size=H // 2, max_position_embeddings=4096)
    print(f"checkpoint: hidden {H}, vocab {args.vocab}, canvas {args.canvas}, {args.layers} layers, 16 experts top-4, "
          f"dtype {args.dtype}; MLX {mx.__version__} on {mx.default_device()}")

    # -- dgemma --------------------------------------------------------------------------------------------------
    model = dgemma.load(path, backend="mlx", dtype=args.dtype)
    be = model.backend
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, args.vocab, args.prompt).tolist()
    canvas = rng.integers(0, args.vocab, (1, args.canvas))
    state = be.prefill(np.array([prompt]))
    mx.eval(state.keys, state.values)
    ours = be.denoise(state, canvas)

    def our_step():
        mx.eval(be.denoise(state, canvas))

    probs = mx.softmax(ours, axis=-1)
    soft = be.soft_embedding(probs)  # made once, as mlx-vlm's step below gets its embeddings made once

    def our_step_sc():
        mx.eval(be.denoise(state, canvas, self_conditioning=soft))

    kw = dict(max_new_tokens=args.new, max_denoising_steps=args.steps, eos_token_ids=[], pad_token_id=0)

    def our_generate():
        return model.generate(prompt, seed=1, **kw)

    # -- mlx-vlm on the same weights ----------------------------------------------------------------------------
    from mlx_vlm.models.diffusion_gemma import Model, ModelConfig

    raw = json.loads((path / "config.json").read_text())
    vcfg = ModelConfig.from_dict(raw)
    # transformers writes the full-attention head shape as text_config.per_layer_config; mlx-vlm 0.7.10 reads only
    # global_head_dim / num_global_key_value_heads (defaults 512 / 2), so hand them over explicitly.
    for over in (raw["text_config"].get("per_layer_config") or {}).values():
        vcfg.text_config.global_head_dim = over.get("head_dim", vcfg.text_config.global_head_dim)
        vcfg.text_config.num_global_key_value_heads = over.get("num_key_value_heads",
                                                              vcfg.text_config.num_global_key_value_heads)
    vcfg.generation_config = {"max_denoising_steps": args.steps, "t_min": 0.4, "t_max": 0.8,
                              "stability_threshold": 1, "confidence_threshold": 0.005,
                              "sampler_config": {"entropy_bound": 0.1}}
    vlm = Model(vcfg)
    weights = vlm.sanitize(mx.load(str(path / "model.safetensors")))
    vlm.load_weights(list(weights.items()), strict=False)
    if args.dtype != "float32":
        vlm.set_dtype(getattr(mx, args.dtype))
    mx.eval(vlm.parameters())
    ids = mx.array([prompt])
    cache = vlm.make_cache()
    cache = vlm.diffusion_prefill_cache(ids, attention_mask=None, cache=cache, pixel_values=None,
                                        mm_token_type_ids=None, prefill_step_size=None, chunk_prefill=False)
    mx.eval([c.state for c in cache])
    vcanvas = mx.array(canvas)
    theirs = vlm.diffusion_decoder_logits(vcanvas, cache)
    sc_emb = vlm.diffusion_self_conditioning(ours, vlm.diffusion_prepare_self_conditioning())

    def vlm_step():
        mx.eval(vlm.diffusion_decoder_logits(vcanvas, cache))

    def vlm_step_sc():
        mx.eval(vlm.diffusion_decoder_logits(vcanvas, cache, sc_emb))

    tok = FakeTokenizer([])

    def vlm_generate():
        return vlm.generate(ids, tokenizer=tok, processor=tok, gen_length=args.new, max_denoising_steps=args.steps,
                            temperature=1.0, diffusion_sampler="entropy-bound", diffusion_full_canvas=True)

    # -- agreement --------------------------------------------------------------------------------------------
    def rel(a, b):
        a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
        return float(np.abs(a - b).max() / np.abs(b).max())

    a, b = np.array(ours), np.array(theirs.astype(mx.float32))
    print(f"\nsame cache + canvas, no self-conditioning: max rel diff dgemma vs mlx-vlm {rel(a, b):.2e}, "
          f"argmax agree {np.mean(a.argmax(-1) == b.argmax(-1)):.3f}")
    a2 = np.array(be.denoise(state, canvas, self_conditioning_probs=probs))
    b2 = np.array(vlm.diffusion_decoder_logits(vcanvas, cache, sc_emb).astype(mx.float32))
    print(f"with self-conditioning:                    max rel diff {rel(a2, b2):.2e}")
    try:
        from reference import load_reference
        from transformers import DynamicCache

        torch.set_num_threads(1)
        ref = load_reference(path)
        c = DynamicCache(config=ref.config.get_text_config(decoder=True))
        t_ids = torch.tensor([prompt])
        with torch.no_grad():
            ref.model.encoder(input_ids=t_ids, past_key_values=c, position_ids=torch.arange(len(prompt))[None])
            r = ref(decoder_input_ids=torch.tensor(canvas), past_key_values=c,
                    decoder_position_ids=torch.arange(len(prompt), len(prompt) + args.canvas)[None]).logits
        print(f"vs transformers reference (float32):      dgemma {rel(a, r.numpy()):.2e}, "
              f"mlx-vlm {rel(b, r.numpy()):.2e}")
    except Exception as e:  # pragma: no cover - reference optional
        print(f"(reference comparison skipped: {e})")

    # -- timings ------------------------------------------------------------------------------------------------
    t_ours, t_theirs = timeit(our_step, args.reps), timeit(vlm_step, args.reps)
    t_ours_sc, t_theirs_sc = timeit(our_step_sc, args.reps), timeit(vlm_step_sc, args.reps)
    with uncompiled_pass(be.model):
        t_core, t_core_sc = timeit(our_step, args.reps), timeit(our_step_sc, args.reps)
    print(f"\none denoising step (decoder + logits), median of {args.reps}:")
    print(f"  no SC:   dgemma {t_ours * 1e3:8.2f} ms   mlx-vlm {t_theirs * 1e3:8.2f} ms   "
          f"ratio mlx-vlm/dgemma {t_theirs / t_ours:.2f}x   (dgemma uncompiled pass {t_core * 1e3:.2f} ms)")
    print(f"  with SC: dgemma {t_ours_sc * 1e3:8.2f} ms   mlx-vlm {t_theirs_sc * 1e3:8.2f} ms   "
          f"ratio {t_theirs_sc / t_ours_sc:.2f}x   (dgemma uncompiled pass {t_core_sc * 1e3:.2f} ms)")
    gen = our_generate()
    passes = gen.stats.decoder_passes
    t_g_ours = timeit(our_generate, max(1, args.reps // 2))
    with uncompiled_pass(be.model):
        t_g_core = timeit(our_generate, max(1, args.reps // 2))
    stats = {}
    vlm.generate(ids, tokenizer=tok, processor=tok, gen_length=args.new, max_denoising_steps=args.steps,
                 temperature=1.0, diffusion_sampler="entropy-bound", diffusion_full_canvas=True, stats=stats)
    v_passes = int(stats.get("diffusion_denoising_steps", 0))
    t_g_theirs = timeit(vlm_generate, max(1, args.reps // 2))
    print(f"whole generation ({args.new} new tokens, <= {args.steps} steps/canvas, incl. prefill):")
    print(f"  dgemma  {t_g_ours:7.3f} s  ({passes} decoder passes, {t_g_ours / passes * 1e3:.2f} ms/pass)")
    print(f"  dgemma, uncompiled pass {t_g_core:7.3f} s  ({t_g_core / passes * 1e3:.2f} ms/pass)")
    print(f"  mlx-vlm {t_g_theirs:7.3f} s  ({v_passes} decoder passes, "
          f"{t_g_theirs / max(v_passes, 1) * 1e3:.2f} ms/pass)")
    print(f"  ratio mlx-vlm/dgemma: {t_g_theirs / t_g_ours:.2f}x total, "
          f"{(t_g_theirs / max(v_passes, 1)) / (t_g_ours / passes):.2f}x per pass")
    # dgemma compiles its decoder pass once per shape bucket: the traces stay few over every pass timed above
    print(f"  dgemma decoder traces over all of the above: {be.model.decoder_traces}")


if __name__ == "__main__":
    main()
