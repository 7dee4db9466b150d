"""Benchmark `dgemma serve`: throughput and latency with 1, 4 and 16 concurrent clients, and the batching speed-up over
serving the same requests one by one.

    python bench/bench_server.py                        # random checkpoint, PyTorch on whatever device is there
    python bench/bench_server.py --model PATH --backend mlx --concurrency 1,4,16 --requests 32

Each level sends the same requests (same prompts, seeds and lengths) through the official `openai` client from that
many threads to a server on a loopback port in this process. "one by one" is the 1-client level: the same requests
served sequentially. With --batching both, the merged and exact engines are measured in turn.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dgemma  # noqa: E402
from dgemma.serve import ServerThread  # noqa: E402


def requests_for(n: int, max_tokens: int) -> list[dict]:
    words = ["alpha", "beta gamma", "delta epsilon zeta eta", "a longer prompt with several words in it", "x"]
    return [{"prompt": f"{words[i % len(words)]} #{i}", "seed": 100 + i, "max_tokens": max_tokens} for i in range(n)]


def run_level(srv: ServerThread, name: str, jobs: list[dict], clients: int, extra: dict) -> dict:
    import openai

    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    lat: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def call(j):
        t0 = time.perf_counter()
        r = c.completions.create(model=name, prompt=j["prompt"], max_tokens=j["max_tokens"], seed=j["seed"],
                                 extra_body=extra)
        dt = time.perf_counter() - t0
        with lock:
            lat.append(dt)
            tokens[0] += r.usage.completion_tokens

    before = srv.worker.stats()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(call, jobs))
    wall = time.perf_counter() - t0
    after = srv.worker.stats()
    passes = after["decoder_passes"] - before["decoder_passes"]
    rows = after["rows_denoised"] - before["rows_denoised"]
    a = np.array(lat)
    return {"clients": clients, "requests": len(jobs), "tokens": tokens[0], "seconds": wall,
            "tokens_per_s": tokens[0] / wall, "p50_s": float(np.percentile(a, 50)),
            "p90_s": float(np.percentile(a, 90)), "p99_s": float(np.percentile(a, 99)),
            "mean_rows_per_pass": rows / passes if passes else 0.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: a fresh random tiny checkpoint)")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--device", default=None)
    ap.add_argument("--canvas-length", type=int, default=32, help="for the random checkpoint")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=32, help="requests per level (the same set at every level)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="max_denoising_steps per request (default: the model's)")
    ap.add_argument("--batching", default="merged", choices=["merged", "exact", "both"])
    ap.add_argument("--prompt-cache-mb", type=float, default=512, help="the server's prompt cache (0 = off)")
    ap.add_argument("--json", action="store_true", help="one JSON line per level instead of the table")
    args = ap.parse_args(argv)

    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            from dgemma.random_model import write_random_checkpoint

            path = write_random_checkpoint(Path(tmp) / "model", canvas_length=args.canvas_length)
        model = dgemma.load(path, backend=args.backend, device=args.device)
        extra = {"ignore_eos": True}  # every request makes exactly max_tokens: levels compare like for like
        if args.steps:
            extra["max_denoising_steps"] = args.steps
        jobs = requests_for(args.requests, args.max_tokens)
        modes = ["merged", "exact"] if args.batching == "both" else [args.batching]
        print(f"# {model.backend.describe()}; canvas {model.config.canvas_length}; {args.requests} requests of "
              f"{args.max_tokens} tokens per level; steps per canvas "
              f"{extra.get('max_denoising_steps', model.sampler_defaults.max_denoising_steps)}", file=sys.stderr)
        for mode in modes:
            with ServerThread(model, model_name="bench", max_batch=max(levels), batching=mode,
                              prompt_cache_mb=args.prompt_cache_mb) as srv:
                run_level(srv, "bench", jobs[: min(4, len(jobs))], min(4, max(levels)), extra)  # warm-up
                results = [run_level(srv, "bench", jobs, c, extra) for c in levels]
            base = next((r for r in results if r["clients"] == 1), None)
            if not args.json:
                print(f"\nbatching={mode}")
                print(f"{'clients':>7} {'tok/s':>9} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} {'rows/pass':>9} "
                      f"{'speed-up':>8}")
            for r in results:
                r["batching"] = mode
                r["speedup_vs_one_by_one"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
                if args.json:
                    print(json.dumps(r))
                else:
                    sp = f"{r['speedup_vs_one_by_one']:.2f}x" if base else "-"
                    print(f"{r['clients']:>7} {r['tokens_per_s']:>9.1f} {r['p50_s']:>7.2f} {r['p90_s']:>7.2f} "
                          f"{r['p99_s']:>7.2f} {r['mean_rows_per_pass']:>9.1f} {sp:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
