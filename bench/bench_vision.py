"""The Gemma 4 vision tower per image at the released checkpoint's dimensions, random weights, on both backends.

    python bench/bench_vision.py                        # CPU, float32, 70 and 280 soft tokens, PyTorch and MLX
    python bench/bench_vision.py --soft-tokens 280 --backends cuda --dtype bfloat16 --device cuda   # on a GPU

The tower is the one that DiffusionGemma-26B-A4B's vision_config describes (Gemma 4's SigLIP-style encoder): hidden
1152, 27 layers, 16 heads of 72, MLP 4304, patch 16, pooling 3x3, standardised output, embedder to the text hidden
size 2816; about 0.57 G parameters. An image of max_soft_tokens soft tokens runs max_soft_tokens x 9 patches (280 ->
2520) through every layer. Preprocessing (Pillow resize, patches) is timed apart. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from dgemma.config import VisionConfig
from dgemma.vision import ImageSettings, preprocess

REAL_VISION = {
    "model_type": "diffusion_gemma", "image_token_id": 258880,
    "text_config": {"hidden_size": 2816, "use_bidirectional_attention": "vision"},
    "vision_config": {"model_type": "gemma4_vision", "hidden_size": 1152, "intermediate_size": 4304,
                      "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 72,
                      "patch_size": 16, "pooling_kernel_size": 3, "position_embedding_size": 10240,
                      "standardize": True, "use_clipped_linears": False, "rope_parameters": {"rope_theta": 100.0}},
}


def tower_flops(v: VisionConfig, patches: int) -> float:
    h, i, d = v.hidden_size, v.intermediate_size, v.head_dim
    per_token = 2 * (h * d * (2 * v.num_attention_heads + 2 * v.num_key_value_heads) + 3 * h * i)
    attention = 4 * patches * patches * v.num_attention_heads * d
    return v.num_hidden_layers * (patches * per_token + attention) + 2 * patches * 3 * v.patch_size**2 * h


def torch_tower(v: VisionConfig, dtype: str, device: str):
    import torch

    from dgemma.backends.cuda.vision import VisionTower

    g = torch.Generator().manual_seed(0)
    tower = VisionTower(v)
    with torch.no_grad():
        for name, p in list(tower.named_parameters()) + list(tower.named_buffers()):
            if name == "inv_freq":
                continue
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    tower = tower.to(device=device, dtype=getattr(torch, dtype)).eval()
    tower.inv_freq = tower.inv_freq.float()

    def run(image):
        with torch.inference_mode():
            out = tower([image])
            if out.is_cuda:
                torch.cuda.synchronize()
        return out

    return run


def mlx_tower(v: VisionConfig, dtype: str):
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from dgemma.backends.mlx.vision import VisionTower

    tower = VisionTower(v)
    rng = np.random.default_rng(0)
    params = []
    for name, p in tree_flatten(tower.parameters()):
        shape = tuple(p.shape)
        w = 1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else rng.standard_normal(shape) / shape[-1] ** 0.5
        params.append((name, mx.array(w.astype(np.float32)).astype(getattr(mx, dtype))))
    tower.update(tree_unflatten(params))
    mx.eval(tower.parameters())

    def run(image):
        out = tower([image])
        mx.eval(out)
        return out

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--soft-tokens", default="70,280", help="max_soft_tokens values (70, 140, 280, 560, 1120)")
    ap.add_argument("--backends", default="cuda,mlx")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu", help="PyTorch device")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (0: its default)")
    ap.add_argument("--layers", type=int, default=27,
                    help="Encoder layers to build (27 is the real tower; fewer to time a slow backend, then the "
                         "per-layer time is printed too)")
    args = ap.parse_args()
    cfg = json.loads(json.dumps(REAL_VISION))
    cfg["vision_config"]["num_hidden_layers"] = args.layers
    v = VisionConfig.from_dict(cfg)
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)  # 4:3, resized to each budget
    rows = []
    for backend in args.backends.split(","):
        if backend == "cuda":
            import torch

            if args.threads:
                torch.set_num_threads(args.threads)
            run = torch_tower(v, args.dtype, args.device)
        else:
            run = mlx_tower(v, args.dtype)
        for n in (int(x) for x in args.soft_tokens.split(",")):
            t0 = time.perf_counter()
            image = preprocess(picture, ImageSettings(max_soft_tokens=n))
            prep = time.perf_counter() - t0
            run(image)  # warm-up (allocations, kernel choice)
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                run(image)
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            flops = tower_flops(v, len(image.patches))
            rows.append({"backend": backend, "device": args.device if backend == "cuda" else "mlx default",
                         "dtype": args.dtype, "max_soft_tokens": n, "soft_tokens": image.num_soft_tokens,
                         "patches": len(image.patches), "seconds_per_image": round(t, 3),
                         "preprocess_seconds": round(prep, 4), "gflop": round(flops / 1e9, 1),
                         "gflop_per_s": round(flops / t / 1e9, 1), "layers": args.layers})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
