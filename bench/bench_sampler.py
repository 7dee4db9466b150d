"""The sampler's vocabulary work per request-pass at Gemma's vocabulary (issue 19, item 3), PyTorch CPU.

    python bench/bench_sampler.py                      # V = 262144, canvas 256, batch 1, 1 and 2 threads
    python bench/bench_sampler.py --vocab 32768 --batch 4

One sampler step (temperature, log-softmax, entropy, argmax, categorical draw, entropy-bound acceptance, re-noise)
on the same float32 logits [B, C, V], three ways, in one run:
- `op-by-op`: dgemma.sampler.step_with_temperature on TorchOps, the reference's program with one log-softmax shared
  (what the engine ran before the chunked sampler), on logits it may overwrite;
- `op-by-op, reused logits`: the same with the page faults of fresh logits taken out of the timing;
- `chunked`: backends/cuda/sampling.ChunkedSampler as the engine calls it (`reuse=True`: probs in a buffer kept
  between passes).
Each is the median of --reps calls after a warm-up. The floor is the traffic that cannot be avoided: read the logits
once and write the probs once, at the machine's measured copy bandwidth, plus one exp per element at the measured
exp rate. Agreement with the op-by-op step on the same logits and noise: argmax, acceptance, drawn tokens, probs and
entropies. A benchmark: it prints, and never fails on a number.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.cuda.backend import TorchOps  # noqa: E402
from dgemma.sampler import step_with_temperature  # noqa: E402


def realistic_logits(B, C, V, seed=0):
    """Soft-capped logits (cap 30, as Gemma's) whose sharpness varies along the canvas: from nearly uniform rows to
    rows with one clear winner, so the entropy bound accepts some positions and not others."""
    g = torch.Generator().manual_seed(seed)
    sharp = torch.linspace(0.5, 6.0, C)[None, :, None]
    x = torch.randn(B, C, V, generator=g) * sharp
    x[..., 7] += torch.linspace(0, 25, C)[None, :]  # a favourite token that grows more certain along the canvas
    return torch.tanh(x / 30.0) * 30.0


def median_seconds(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def floor_seconds(B, C, V):
    """(floor, copy GB/s, exp G/s): one read of the logits, one write of the probs, one exp per element."""
    n = B * C * V
    src, dst = torch.randn(n), torch.empty(n)
    copy = median_seconds(lambda: dst.copy_(src), 3)
    gbps = 2 * 4 * n / copy / 1e9  # read + write
    small = torch.randn(1 << 20)
    out = torch.empty_like(small)
    exp = median_seconds(lambda: torch.exp(small, out=out), 20)
    exps = small.numel() / exp / 1e9
    return 8 * n / (gbps * 1e9) + n / (exps * 1e9), gbps, exps


def run(args, threads):
    torch.set_num_threads(threads)
    B, C, V = args.batch, args.canvas, args.vocab
    ops = TorchOps(torch.device("cpu"))
    logits = realistic_logits(B, C, V)
    g = torch.Generator().manual_seed(1)
    canvas = torch.randint(0, V, (B, C), generator=g)
    uniforms = torch.rand(B, C, generator=g)
    renoise = torch.randint(0, V, (B, C), generator=g)
    t, bound = 0.6, 0.1
    work = torch.empty_like(logits)

    def op_by_op_fresh():
        return step_with_temperature(ops, logits.clone(), canvas, t, bound, uniforms, renoise, owns_logits=True)

    def op_by_op_reused():
        work.copy_(logits)  # counted: about one copy's time, see the floor's bandwidth
        return step_with_temperature(ops, work, canvas, t, bound, uniforms, renoise, owns_logits=True)

    def chunked():
        return ops.fused_step(logits, canvas, t, bound, uniforms, renoise, reuse=True)

    with torch.inference_mode():
        times = {name: median_seconds(fn, args.reps) for name, fn in
                 (("op-by-op", op_by_op_fresh), ("op-by-op, reused logits", op_by_op_reused), ("chunked", chunked))}
        copy_time = median_seconds(lambda: work.copy_(logits), 3)
        times["op-by-op, reused logits"] -= copy_time
        want, got = op_by_op_fresh(), chunked()
    floor, gbps, exps = floor_seconds(B, C, V)
    base = times["op-by-op"]
    print(f"\n## {threads} thread(s): B={B} C={C} V={V} float32 ({B * C * V * 4 / 1e6:.0f} MB of logits); floor "
          f"{floor * 1e3:.0f} ms ({gbps:.1f} GB/s copy, {exps:.2f} G exp/s)")
    print("| sampler step | ms per request-pass | vs op-by-op | x floor |")
    print("|---|---:|---:|---:|")
    for name, s in times.items():
        print(f"| {name} | {s / B * 1e3:.1f} | {base / s:.2f}x | {s / floor:.1f} |")
    names = ("canvas", "argmax", "probs", "mean_entropy", "accepted", "entropy")
    w, o = dict(zip(names, want)), dict(zip(names, got))
    print(f"agreement with op-by-op: argmax {(w['argmax'] == o['argmax']).float().mean():.4f}, accepted "
          f"{(w['accepted'] == o['accepted']).float().mean():.4f}, next canvas "
          f"{(w['canvas'] == o['canvas']).float().mean():.4f}; max |probs diff| "
          f"{(w['probs'] - o['probs']).abs().max():.2e}, max |entropy diff| "
          f"{(w['entropy'] - o['entropy']).abs().max():.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    for threads in args.threads:
        run(args, threads)


if __name__ == "__main__":
    main()
