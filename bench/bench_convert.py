"""Benchmark `dgemma convert` on a synthetic checkpoint with the real tensor shapes (a few layers of
google/diffusiongemma-26B-A4B-it: full 262144 x 2816 embedding, 128 experts of width 704 per layer).

    python bench/bench_convert.py [--layers 1] [--dir /tmp/dg-bench] [--keep]

Writes the source once (bf16, one shard per layer), converts it to mlx 4-bit and cuda fp8 (and cuda int4), each in a
fresh subprocess so that peak RSS (getrusage ru_maxrss) belongs to that conversion alone, and reports wall time,
GB/s (source bytes read per second) and peak RSS against the goal: peak RSS < 1.5 x largest tensor + 1 GB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))


def real_config(layers: int) -> dict:
    return {
        "model_type": "diffusion_gemma", "architectures": ["DiffusionGemmaForBlockDiffusion"], "canvas_length": 256,
        "dtype": "bfloat16", "eos_token_id": [1, 106, 50], "pad_token_id": 0,
        "text_config": {
            "model_type": "diffusion_gemma_text", "hidden_size": 2816, "num_hidden_layers": layers,
            "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "global_head_dim": 512,
            "num_global_key_value_heads": 2, "num_experts": 128, "top_k_experts": 8, "moe_intermediate_size": 704,
            "intermediate_size": 2112, "vocab_size": 262144, "max_position_embeddings": 262144, "sliding_window": 1024,
            "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        },
    }


def write_source(folder: Path, layers: int) -> tuple[int, int]:
    import torch
    from safetensors.torch import save_file

    from dgemma.config import ModelConfig
    from dgemma.convert.plan import text_shapes

    cfg_raw = real_config(layers)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg_raw, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"max_denoising_steps": 48}))
    shapes = text_shapes(ModelConfig.from_dict(cfg_raw))
    groups: dict[str, list[str]] = {}
    for n in shapes:
        key = n.split(".layers.")[1].split(".")[0] if ".layers." in n else "rest"
        groups.setdefault(key, []).append(n)
    wmap, total, largest = {}, 0, 0
    g = torch.Generator().manual_seed(0)
    for i, (key, names) in enumerate(groups.items()):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in names:
            s = shapes[n]
            t = torch.empty(s, dtype=torch.bfloat16)
            t.normal_(0, 0.02, generator=g) if len(s) > 1 else t.fill_(1.0)
            tensors[n] = t
            wmap[n] = fname
            total += t.numel() * 2
            largest = max(largest, t.numel() * 2)
        save_file(tensors, folder / fname, metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": wmap}))
    return total, largest


CHILD = """
import json, sys
from dgemma.convert import convert
r = convert(sys.argv[1], sys.argv[2], progress=False, force=True, **json.loads(sys.argv[3]))
print(json.dumps({"seconds": r.seconds, "src": r.src_bytes, "dst": r.dst_bytes, "rss": r.peak_rss_bytes,
                  "est": r.estimated_peak_bytes, "shards": r.shards}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=1, help="decoder layers to synthesize (each ~1.6 GB in bf16)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dgemma-bench-convert"))
    ap.add_argument("--keep", action="store_true", help="keep the synthetic source and outputs")
    ap.add_argument("--targets", default="mlx4,fp8,int4")
    args = ap.parse_args()
    src = args.dir / f"src-{args.layers}L"
    t0 = time.perf_counter()
    meta = src / "bench.json"
    if meta.exists():
        total, largest = json.loads(meta.read_text())
    else:
        shutil.rmtree(src, ignore_errors=True)
        total, largest = write_source(src, args.layers)
        meta.write_text(json.dumps([total, largest]))
        print(f"wrote synthetic source {src}: {total / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
    goal = 1.5 * largest + 1e9
    print(f"source {total / 1e9:.2f} GB, largest tensor {largest / 1e9:.2f} GB -> goal: peak RSS < {goal / 1e9:.2f} GB")
    targets = {"mlx4": dict(to="mlx", bits=4), "mlx-mixed": dict(to="mlx", mixed=True),
               "fp8": dict(to="cuda", quant="fp8"), "int4": dict(to="cuda", quant="int4"), "hf": dict(to="hf")}
    print(f"{'target':<10} {'wall s':>7} {'GB/s':>6} {'out GB':>7} {'peak RSS GB':>12} {'estimate':>9}  goal")
    for name in args.targets.split(","):
        dst = args.dir / f"out-{name}"
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), json.dumps(targets[name])],
                             capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t
        if res.returncode:
            print(f"{name}: failed\n{res.stderr[-2000:]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        ok = "ok" if r["rss"] < goal else "MISSED"
        print(f"{name:<10} {wall:>7.1f} {r['src'] / 1e9 / r['seconds']:>6.2f} {r['dst'] / 1e9:>7.2f} "
              f"{r['rss'] / 1e9:>12.2f} {r['est'] / 1e9:>9.2f}  {ok}")
        if not args.keep:
            shutil.rmtree(dst, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(src, ignore_errors=True)


if __name__ == "__main__":
    main()
