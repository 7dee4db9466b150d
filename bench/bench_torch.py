"""PyTorch backend vs transformers' reference: one denoising step and one whole generation, same random checkpoint,
same run, same inputs (identical outputs are checked). Also counts the FLOPs and bytes of a step and reports how far
the measured time is from that floor.

    python bench/bench_torch.py                 # CPU: a ~430 MB float32 model, canvas 256, 1 thread and all threads
    python bench/bench_torch.py --gpu           # CUDA: real DiffusionGemma-26B-A4B dimensions, random bf16 weights
                                                # built on the GPU, canvas 256, batch 1 and 4, against the H100 floor

This is a benchmark, not a test: it prints numbers and never fails on them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import dgemma  # noqa: E402
from dgemma.config import ModelConfig  # noqa: E402
from dgemma.sampler import ScriptedNoise, StableAndConfident, denoise_step  # noqa: E402

# The real model's shape in miniature: 128 experts top-8 beside a dense MLP, 5 sliding : 1 full layers, a vocabulary
# much larger than the hidden size. About 740 MB in float32 (experts 1/4 of the hidden size wide, as in the real model).
BENCH_TEXT = dict(vocab_size=32768, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64, global_head_dim=128,
                  num_global_key_value_heads=2, sliding_window=128, num_experts=128, top_k_experts=8,
                  moe_intermediate_size=128, max_position_embeddings=8192)

REAL_TEXT = dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                 num_global_key_value_heads=2, sliding_window=1024, num_experts=128, top_k_experts=8,
                 moe_intermediate_size=704, max_position_embeddings=262144)


def step_cost(cfg: ModelConfig, B: int, C: int, cache_len: int, bytes_per_param: float) -> tuple[float, float]:
    """FLOPs and bytes of one denoising step (decoder pass + self-conditioning + LM head + sampler reads)."""
    H, V, I, MI, k, E = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.moe_intermediate_size,
                         cfg.top_k_experts, cfg.num_experts)
    flops, params = 0.0, V * H + 3 * H * I
    tokens = B * C
    for s in cfg.layers:
        nq, nkv, d = cfg.num_attention_heads, s.num_kv_heads, s.head_dim
        attn_params = H * nq * d * 2 + H * nkv * d * (2 if s.sliding else 1)
        kv = min(cache_len, cfg.sliding_window - 1) if s.sliding else cache_len
        flops += 2 * tokens * (attn_params + 3 * H * I + k * 3 * H * MI + H * E)
        flops += 4 * tokens * nq * d * (kv + C)  # QK^T and PV
        params += attn_params + 3 * H * I + E * 3 * H * MI + H * E
    flops += 2 * tokens * 3 * H * I          # self-conditioning MLP
    flops += 2 * 2 * tokens * V * H          # soft embedding (probs @ E) and the LM head
    # Weights once (all experts are hit at 256 tokens x top-k), logits written once and read by the sampler.
    bytes_moved = params * bytes_per_param + 3 * tokens * V * 4
    return flops, bytes_moved


def matmul_peak(dtype=torch.float32, device="cpu", n=2048) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    reps = 5
    for _ in range(reps):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def timeit(fn, reps=3, sync=None):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def reference_step(ref, cache, canvas, sc_logits, dmask, pos, k, N, stopper):
    """One step of the reference's `_denoising_step`: decoder forward, temperature, sample, accept, re-noise, stop."""
    from transformers.models.diffusion_gemma import generation_diffusion_gemma as gen

    out = ref(decoder_input_ids=canvas, past_key_values=cache, self_conditioning_logits=sc_logits,
              decoder_attention_mask=dmask, decoder_position_ids=pos).logits
    processed = gen.LinearTemperatureScheduleLogitsProcessor(0.4, 0.8, N)(None, out, cur_step=torch.tensor(k))
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
    sampled = torch.multinomial(probs.view(-1, probs.shape[-1]), 1).view(canvas.shape)
    sampler = gen.EntropyBoundSampler(gen.EntropyBoundSamplerConfig(0.1), canvas.shape[1], probs.shape[-1], N)
    accepted = sampler.accept_canvas(canvas, sampled, processed, k)
    new = sampler.renoise_canvas(accepted, k)
    stopper(processed.argmax(-1), processed)
    return new, processed


def our_step(model, state, canvas, probs, k, N, stopper, noise):
    """A step through the low-level API (`backend.denoise` + `denoise_step`): every call returns fresh arrays."""
    ops = model.backend.ops
    logits = model.backend.denoise(state, canvas, self_conditioning_probs=probs)
    C = canvas.shape[1]
    u = ops.stack_rows([n.uniforms(0, k, C) for n in noise])
    r = ops.stack_rows([n.tokens(0, k, C, model.config.vocab_size) for n in noise])
    res = denoise_step(ops, logits, canvas, steps_remaining=k, max_steps=N, t_min=0.4, t_max=0.8,
                       entropy_bound=0.1, uniforms=u, renoise_tokens=r, owns_logits=True)
    ops.to_numpy(stopper(res.argmax, res.mean_entropy))  # the one [B] host read per step
    return res.canvas, res.probs


def engine_step(model, state, canvas, soft, k, N, stopper, noise):
    """A step as the engine runs it: decoder to hidden, LM head and sampler in the backend's buffers kept between
    passes (a fresh 32 MB logits array faults its pages in again on every step), self-conditioning in hidden space."""
    from dgemma.sampler import temperature

    b, ops, C = model.backend, model.backend.ops, canvas.shape[1]
    hidden = b.denoise_hidden(state, canvas, soft)
    u = ops.stack_rows([n.uniforms(0, k, C) for n in noise])
    r = ops.stack_rows([n.tokens(0, k, C, model.config.vocab_size) for n in noise])
    res = ops.fused_step(b.lm_logits(hidden), canvas, temperature(k, N, 0.4, 0.8), 0.1, u, r, reuse=True)
    ops.to_numpy(stopper(res[1], res[3]))  # the one [B] host read per step
    return res[0], b.soft_embedding(res[2])


def cpu_bench(args):
    from reference import injected_noise, load_reference, make_checkpoint
    from transformers import DynamicCache

    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="dgemma-bench-"))
    path = tmp / "bench-ckpt"
    if not (path / "config.json").exists():
        print(f"writing random checkpoint to {path} ...", flush=True)
        make_checkpoint(path, canvas_length=args.canvas, scale=0.5, **BENCH_TEXT)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    ref = load_reference(path)
    model = dgemma.load(path, backend="cuda")
    cfg = model.config
    C, N, T = cfg.canvas_length, args.steps, args.prompt_len
    print(f"model: {size / 1e6:.0f} MB float32, canvas {C}, vocab {cfg.vocab_size}, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_experts} experts top-{cfg.top_k_experts}; prompt {T}; torch {torch.__version__}")
    flops, nbytes = step_cost(cfg, 1, C, T, 4)
    results = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        peak = matmul_peak()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, cfg.vocab_size, (1, T), generator=g)
        canvas = torch.randint(0, cfg.vocab_size, (1, C), generator=g)
        with torch.inference_mode():
            cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
            ref.model.encoder(input_ids=ids, past_key_values=cache, position_ids=torch.arange(T)[None])
            dmask = torch.ones(1, T + C, dtype=torch.bool)
            pos = torch.arange(T, T + C)[None]
            stop_ref = __import__("transformers").models.diffusion_gemma.generation_diffusion_gemma \
                .StableAndConfidentStoppingCriteria(1, 0.005)
            sc_ref = ref(decoder_input_ids=canvas, past_key_values=cache, decoder_attention_mask=dmask,
                         decoder_position_ids=pos).logits
            t_ref = timeit(lambda: reference_step(ref, cache, canvas, sc_ref, dmask, pos, N // 2, N, stop_ref),
                           args.reps)
            state = model.prefill(ids.numpy())
            noise = [ScriptedNoise(0, model.backend.ops)]
            probs = torch.softmax(torch.as_tensor(sc_ref), -1)
            stop = StableAndConfident(model.backend.ops, 1, 0.005)
            t_api = timeit(lambda: our_step(model, state, canvas, probs, N // 2, N, stop, noise), args.reps)
            soft = model.backend.soft_embedding(probs)
            t_ours = timeit(lambda: engine_step(model, state, canvas, soft, N // 2, N, stop, noise), args.reps)
        # Whole generation, same injected noise on both sides: the tokens must be identical.
        kw = dict(max_new_tokens=C, max_denoising_steps=N, eos_token_ids=[1], pad_token_id=0)
        t0 = time.perf_counter()
        ours = model.generate_batch([ids[0].tolist()], noises=[ScriptedNoise(5, model.backend.ops)], **kw)[0]
        t_gen_ours = time.perf_counter() - t0
        with injected_noise([5], cfg.vocab_size, C), torch.inference_mode():
            t0 = time.perf_counter()
            out = ref.generate(ids, max_new_tokens=C, max_denoising_steps=N, eos_token_id=[1], pad_token_id=0)
            t_gen_ref = time.perf_counter() - t0
        want = out.sequences[0, T:].tolist()
        same = f"{sum(a == b for a, b in zip(want, ours.raw_token_ids))} of {len(want)}"
        floor = max(flops / peak, 0.0)
        results[threads] = dict(step_ref_ms=t_ref * 1e3, step_ours_ms=t_ours * 1e3, step_speedup=t_ref / t_ours,
                                step_api_ms=t_api * 1e3, step_api_speedup=t_ref / t_api,
                                gen_ref_s=t_gen_ref, gen_ours_s=t_gen_ours, gen_speedup=t_gen_ref / t_gen_ours,
                                identical_tokens=same, passes=ours.stats.decoder_passes,
                                matmul_gflops=peak / 1e9, step_gflop=flops / 1e9, step_mb=nbytes / 1e6,
                                floor_ms=floor * 1e3, ours_vs_floor=t_ours / floor)
        r = results[threads]
        print(f"\n[{threads} thread(s)] matmul peak {r['matmul_gflops']:.1f} GFLOP/s; one step = "
              f"{r['step_gflop']:.2f} GFLOP, {r['step_mb']:.0f} MB moved -> compute floor {r['floor_ms']:.1f} ms")
        print(f"  denoising step : reference {r['step_ref_ms']:8.1f} ms | dgemma {r['step_ours_ms']:8.1f} ms | "
              f"speed-up x{r['step_speedup']:.2f} | dgemma at {r['ours_vs_floor']:.2f}x the floor (the engine's step)")
        print(f"  low-level API  : dgemma {r['step_api_ms']:8.1f} ms (backend.denoise + denoise_step, fresh arrays) | "
              f"speed-up x{r['step_api_speedup']:.2f}")
        print(f"  generation     : reference {r['gen_ref_s']:8.2f} s  | dgemma {r['gen_ours_s']:8.2f} s  | "
              f"speed-up x{r['gen_speedup']:.2f} | {r['passes']} passes | tokens identical: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def gpu_bench(args):
    """Real dimensions, random bf16 weights made on the GPU (no checkpoint), one denoising step per batch size."""
    from dgemma.backends.cuda.backend import TorchOps
    from dgemma.backends.cuda.model import DiffusionGemmaText

    assert torch.cuda.is_available(), "--gpu needs a CUDA device"
    dev = torch.device("cuda")
    raw = {"model_type": "diffusion_gemma", "canvas_length": 256, "text_config": dict(REAL_TEXT)}
    cfg = ModelConfig.from_dict(raw)
    with torch.device("meta"):
        net = DiffusionGemmaText(cfg).to(torch.bfloat16)
    net.to_empty(device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0, p.shape[-1] ** -0.5, generator=g)
        for layer in net.layers:
            layer.layer_scalar.fill_(1.0)
            layer.encoder_layer_scalar.fill_(1.0)
    net.reset_rope()
    net.eval()
    ops = TorchOps(dev)
    params = sum(p.numel() for p in net.parameters())
    print(f"{torch.cuda.get_device_name()}: {params / 1e9:.2f}B params in bf16 ({params * 2 / 1e9:.1f} GB), "
          f"torch {torch.__version__}")
    peak = matmul_peak(torch.bfloat16, "cuda", 8192)
    for B in args.batch:
        ids = torch.randint(3, cfg.vocab_size, (B, args.prompt_len), device=dev)
        canvas = torch.randint(0, cfg.vocab_size, (B, 256), device=dev)
        with torch.inference_mode():
            state = net.encode(ids, torch.ones_like(ids, dtype=torch.bool), None)
            logits = net.decode(canvas, state)
            probs = torch.softmax(logits / 0.6, -1)
            stop = StableAndConfident(ops, 1, 0.005)

            def step():
                lg = net.decode(canvas, state, probs)
                res = denoise_step(ops, lg, canvas, steps_remaining=24, max_steps=48, t_min=0.4, t_max=0.8,
                                   entropy_bound=0.1, uniforms=torch.rand(B, 256, device=dev),
                                   renoise_tokens=torch.randint(0, cfg.vocab_size, (B, 256), device=dev),
                                   owns_logits=True)
                ops.to_numpy(stop(res.argmax, res.mean_entropy))

            t = timeit(step, args.reps, sync=torch.cuda.synchronize)
        flops, nbytes = step_cost(cfg, B, 256, args.prompt_len, 2)
        floor = max(flops / peak, nbytes / (args.bandwidth * 1e12))
        print(f"batch {B}: step {t * 1e3:.1f} ms | floor {floor * 1e3:.1f} ms ({flops / 1e12:.2f} TFLOP, "
              f"{nbytes / 1e9:.1f} GB; measured bf16 matmul {peak / 1e12:.0f} TFLOP/s, {args.bandwidth} TB/s) | "
              f"{t / floor:.2f}x the floor | DESIGN.md H100 bf16 floor 15.5 ms/step | "
              f"{B * 256 / t:.0f} canvas tokens/s per step")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3,
                    help="max denoising steps of the whole-generation run (a random MoE amplifies float rounding "
                         "through expert-routing flips, so long runs drift apart on random weights; see README)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bandwidth", type=float, default=3.35, help="TB/s for the GPU floor (H100 SXM: 3.35)")
    ap.add_argument("--workdir", help="keep the random checkpoint here between runs")
    ap.add_argument("--json", help="write the CPU results here")
    args = ap.parse_args()
    gpu_bench(args) if args.gpu else cpu_bench(args)


if __name__ == "__main__":
    main()
