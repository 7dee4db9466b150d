"""The GPU measurement of issue 19: DiffusionGemma-26B-A4B's real dimensions (DESIGN.md section 1) with random weights
written straight into a PyTorch backend model on the device (no checkpoint file), bf16 / FP8 / int4 experts, exact
and fast mode through the one engine at batch 1, 4 and 16, one canvas of 16 denoising steps per row; step time and
tok/s against the floor of DESIGN.md section 5.

    python bench/bench_gpu.py                                  # a lent GPU: 30 layers, full widths (~52 GB in bf16)
    python bench/bench_gpu.py --experts fp8 --batch 1          # the vLLM comparison cell (1288 tok/s H200, 1008 H100)
    python bench/bench_gpu.py --device cpu --layers 2 --scale 0.03 --steps 2 --batch 1 2 --dtype float32  # CPU smoke

What runs, per (experts, batch, mode): one engine request per row (random 64-token prompts, left-padded into one
prefill), `max_denoising_steps` 16 and a stopping rule that cannot fire on random weights (confidence threshold 1e-9),
eos off, so every row denoises exactly 16 passes. The timed run follows an untimed warm-up of the same shape.
  step ms  = wall of the whole generation (prefill and commit included) / decoder passes, device synchronised;
  tok/s    = batch x canvas (256) / wall, i.e. 256 / (16 x step time) per row as DESIGN.md section 5 counts it.
Modes: exact; fast (FastPolicy defaults: freeze_after 2, freeze_entropy 0.05, refresh_every 8): random weights are
never confident, so it freezes (almost) nothing and shows the fast path's bookkeeping cost; fast-forced
(freeze_entropy 1e9, freeze_after 1): a position freezes as soon as its argmax holds one pass, so the run measures
what the fast path gains when most of the canvas settles, as on a trained model (the forwarded positions per pass
are printed). The experts: bf16 (packed [E, 2I, H] with grouped matmuls), FP8 (float8_e4m3fn with per-row scales,
backends/cuda/quantized.FP8Experts) and int4 (two values per byte, group scales, quantized.Int4Experts); the other
weights stay bf16.

CUDA graphs: backends/cuda has no graph capture (no torch.cuda.CUDAGraph / torch.compile over the denoising pass);
this script says so and runs graphs off only. The floor is DESIGN.md section 5's for the card when it is an H200 or
H100 (bf16 / 8-bit / 4-bit bytes of one step over the bandwidth), else the bytes over --bandwidth; it applies to the
full model only (--layers 30 --scale 1). This is a benchmark: it prints numbers and never fails on them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dgemma.backends.cuda.backend import TorchBackend, TorchOps  # noqa: E402
from dgemma.backends.cuda.model import DiffusionGemmaText  # noqa: E402
from dgemma.backends.cuda.quantized import FP8_MAX, FP8Experts, Int4Experts  # noqa: E402
from dgemma.config import ModelConfig, SamplerSettings  # noqa: E402
from dgemma.engine import FastPolicy  # noqa: E402
from dgemma.engine.engine import Engine  # noqa: E402
from dgemma.engine.request import Request  # noqa: E402

REAL_TEXT = dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                 num_global_key_value_heads=2, sliding_window=1024, num_experts=128, top_k_experts=8,
                 moe_intermediate_size=704, max_position_embeddings=262144, final_logit_softcapping=30.0,
                 rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
CANVAS = 256
# DESIGN.md section 5: ms per step (bf16 / 8-bit / 4-bit) and the published vLLM figure (FP8, batch 1, 16 steps).
FLOORS = {"H200": ({"bf16": 10.8, "fp8": 5.4, "int4": 2.9}, 1288), "H100": ({"bf16": 15.5, "fp8": 7.8, "int4": 4.2},
                                                                          1008)}
STEP_GB = {"bf16": 52.0, "fp8": 26.0, "int4": 14.0}
EXPERT_KINDS = ("bf16", "fp8", "int4")
MODES = ("exact", "fast", "fast-forced")
INT4_GROUP = 64


def scaled_config(layers: int, scale: float) -> ModelConfig:
    """The real text config with `layers` layers and every width times `scale` (kept even, at least 8)."""
    text = dict(REAL_TEXT, num_hidden_layers=layers)
    if scale != 1:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "head_dim", "global_head_dim",
                    "moe_intermediate_size"):
            text[key] = max(8, 2 * round(REAL_TEXT[key] * scale / 2))
        text["sliding_window"] = max(32, int(REAL_TEXT["sliding_window"] * scale))
    return ModelConfig.from_dict({"model_type": "diffusion_gemma", "canvas_length": CANVAS, "text_config": text})


def random_fp8(shape, device, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn [E, rows, K], float32 per-row scales [E, rows, 1]) of weights ~ N(0, K^-1)."""
    w = torch.randn(shape, device=device, generator=gen, dtype=torch.bfloat16)
    scale = torch.full((*shape[:-1], 1), shape[-1] ** -0.5 * 4 / FP8_MAX, device=device)
    return (w * (FP8_MAX / 4)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def random_int4(shape, device, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [E, rows, K/2]: two 4-bit values per byte, float scales [E, rows, K/group]) of weights ~ N(0, K^-1)."""
    E, rows, K = shape
    packed = torch.randint(0, 256, (E, rows, K // 2), device=device, generator=gen, dtype=torch.uint8)
    groups = -(-K // min(INT4_GROUP, K))
    scale = torch.full((E, rows, groups), K ** -0.5 / 4.6, device=device, dtype=torch.bfloat16)
    return packed, scale


def build_model(cfg: ModelConfig, experts: str, device: torch.device, dtype, seed: int = 0) -> DiffusionGemmaText:
    """The decoder with random weights in `dtype` made on `device`; quantized experts are swapped in on the meta
    device, so their bf16 copies are never allocated."""
    with torch.device("meta"):
        net = DiffusionGemmaText(cfg).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    if experts != "bf16":
        make = random_fp8 if experts == "fp8" else random_int4
        for layer in net.layers:
            gate_up, down = make((E, 2 * I, H), device, gen), make((E, H, I), device, gen)
            layer.experts = FP8Experts(gate_up, down) if experts == "fp8" else Int4Experts(gate_up, down, INT4_GROUP)
    net.to_empty(device=device)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0, p.shape[-1] ** -0.5, generator=gen)
        for layer in net.layers:
            layer.layer_scalar.fill_(1.0)
            layer.encoder_layer_scalar.fill_(1.0)
    for p in net.parameters():
        p.requires_grad_(False)
    net.reset_rope()
    return net.eval()


def backend_around(net: DiffusionGemmaText, cfg: ModelConfig, device: torch.device, dtype) -> TorchBackend:
    """A TorchBackend over an in-memory model (what TorchBackend.__init__ sets up after loading a checkpoint)."""
    be = TorchBackend.__new__(TorchBackend)
    be.checkpoint = SimpleNamespace(config=cfg, path=Path("<random weights>"), raw_config={})
    be.config, be.device, be.dtype, be.quantized = cfg, device, dtype, set()
    be.model, be.ops = net, TorchOps(device)
    be.pass_width = max(cfg.canvas_length, be.prefill_chunk)
    return be


def policy(mode: str) -> FastPolicy | None:
    if mode == "exact":
        return None
    return FastPolicy() if mode == "fast" else FastPolicy(freeze_after=1, freeze_entropy=1e9, refresh_every=8)


def run_batch(be: TorchBackend, batch: int, mode: str, steps: int, prompt_len: int, seed: int):
    """(wall seconds, decoder passes, mean forwarded positions per pass) of one canvas for `batch` rows."""
    settings = SamplerSettings(max_new_tokens=CANVAS, max_denoising_steps=steps, confidence_threshold=1e-9,
                               eos_token_ids=(), pad_token_id=0)
    rng = np.random.default_rng(seed)
    reqs = [Request(prompt_ids=rng.integers(3, be.config.vocab_size, prompt_len).tolist(), settings=settings,
                    seed=seed + i, speed="exact" if mode == "exact" else "fast", fast=policy(mode))
            for i in range(batch)]
    engine, widths = Engine(be), []
    original = engine._active_positions

    def counted(rows):
        got = original(rows)
        widths.append(CANVAS if got is None else got[0].shape[1])
        return got

    engine._active_positions = counted
    sync()
    t0 = time.perf_counter()
    handles = engine.submit_group(reqs)
    for _ in engine.run(handles):
        pass
    sync()
    wall = time.perf_counter() - t0
    failed = [h.error for h in handles if h.error is not None]
    if failed:
        raise failed[0]
    return wall, engine.counters["decoder_passes"], float(np.mean(widths)) if widths else float("nan")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def floor_for(args, experts: str, full: bool) -> tuple[float | None, str, int | None]:
    """(floor ms per step, where it comes from, vLLM's published tok/s for the card) or (None, why, None)."""
    if not full:
        return None, "no floor (reduced model)", None
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    for card, (floors, vllm) in FLOORS.items():
        if card in name:
            return floors[experts], f"DESIGN.md {card}", vllm
    if args.bandwidth:
        return STEP_GB[experts] / args.bandwidth, f"{STEP_GB[experts]:.0f} GB / {args.bandwidth} TB/s", None
    return None, "no floor (unknown card; pass --bandwidth TB/s)", None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--scale", type=float, default=1.0, help="every width times this (1: the real model)")
    ap.add_argument("--experts", nargs="+", default=list(EXPERT_KINDS), choices=EXPERT_KINDS)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--bandwidth", type=float, default=None, help="TB/s, for a card DESIGN.md does not list")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="the non-expert weights and activations (float32: a CPU smoke run, bf16 is slow there)")
    args = ap.parse_args()
    if args.layers < 1 or not 0 < args.scale <= 1 or args.steps < 1 or min(args.batch) < 1:
        print("error: --layers, --steps and --batch must be >= 1 and --scale in (0, 1]", file=sys.stderr)
        raise SystemExit(2)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device}: this PyTorch build has no CUDA GPU available", file=sys.stderr)
        raise SystemExit(2)
    cfg = scaled_config(args.layers, args.scale)
    full = args.layers == REAL_TEXT["num_hidden_layers"] and args.scale == 1
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"bench_gpu: {where}, torch {torch.__version__}; {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"vocab {cfg.vocab_size}, {cfg.num_experts} experts top-{cfg.top_k_experts} of width "
          f"{cfg.moe_intermediate_size}, canvas {CANVAS}, prompt {args.prompt_len}, {args.steps} steps per canvas, "
          f"{args.dtype} (experts: as each row says)")
    print("CUDA graphs: not in the code (backends/cuda captures no graph and compiles no denoising pass): every "
          "row below is graphs off")
    print("\n| experts | batch | mode | step ms | tok/s | passes | forwarded / pass | floor ms | step / floor "
          "| vs vLLM published |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for experts in args.experts:
        t0 = time.perf_counter()
        dtype = getattr(torch, args.dtype)
        net = build_model(cfg, experts, device, dtype)
        be = backend_around(net, cfg, device, dtype)
        built = time.perf_counter() - t0
        params = sum(t.numel() * t.element_size() for t in list(net.parameters()) + list(net.buffers()))
        print(f"<!-- {experts}: {params / 1e9:.2f} GB of weights on {device}, built in {built:.1f} s -->", flush=True)
        floor, source, vllm = floor_for(args, experts, full)
        for batch in args.batch:
            for mode in args.modes:
                run_batch(be, batch, mode, args.steps, args.prompt_len, seed=1)  # warm-up (allocator, kernels)
                wall, passes, width = run_batch(be, batch, mode, args.steps, args.prompt_len, seed=2)
                step = wall / max(passes, 1)
                tok_s = batch * CANVAS / wall
                vs_floor = f"{1e3 * step / floor:.2f}x ({source})" if floor else source
                vs_vllm = f"{tok_s / vllm:.2f}x of {vllm}" if vllm and experts == "fp8" and batch == 1 else ""
                print(f"| {experts} | {batch} | {mode} | {1e3 * step:.1f} | {tok_s:.1f} | {passes} | {width:.1f} "
                      f"| {floor if floor else ''} | {vs_floor} | {vs_vllm} |", flush=True)
        del be, net
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
