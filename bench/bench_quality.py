"""The quality yardstick (`dgemma.quality`) of the shipped text model on both backends, and of every `dgemma convert`
target against it.

    python bench/bench_quality.py                       # float model on PyTorch and MLX, then every convert target
    python bench/bench_quality.py --targets none        # the float yardstick only
    python bench/bench_quality.py --backends cuda --targets fp8,int4 --json /tmp/q.json

For the float checkpoint on each backend: the held-out denoising loss at t = 0.25 / 0.5 / 0.75 (one decoder pass
over a fixed corruption, the same draws on both backends), the accuracy on the replaced tokens, and the tokens per
forward and steps per canvas of generation under the checkpoint's sampler (fixed prompts and noise). Then each
convert target is written to a temporary folder ("bf16": the float checkpoint loaded as bfloat16) and measured on
every backend that loads it: the same losses, and the agreement of its generated tokens with the float model's on
the same backend (same prompts, same noise; position by position). A format a backend cannot run is reported as
such, with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dgemma  # noqa: E402
from dgemma.convert import convert  # noqa: E402
from dgemma import quality  # noqa: E402

# name -> dgemma.convert keyword arguments (the `dgemma convert` flags)
TARGETS = {
    "mlx-8bit": dict(to="mlx", bits=8),
    "mlx-4bit": dict(to="mlx", bits=4),
    "mlx-mixed": dict(to="mlx", mixed=True),
    "fp8": dict(to="cuda", quant="fp8"),
    "int4": dict(to="cuda", quant="int4"),
}
LOAD_DTYPES = {"bf16": "bfloat16"}   # not a conversion: the float checkpoint loaded in this dtype
FLAGS = {"mlx-8bit": "--to mlx --bits 8", "mlx-4bit": "--to mlx --bits 4", "mlx-mixed": "--to mlx --mixed",
         "fp8": "--to cuda --quant fp8", "int4": "--to cuda --quant int4", "bf16": "float32 loaded as bfloat16"}


def measure(folder, backend: str, docs, args, dtype=None) -> tuple[dict | None, list | None, str | None]:
    """(yardstick as JSON, generated tokens, None) or (None, None, why it does not run)."""
    try:
        model = dgemma.load(folder, backend=backend, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - a format a backend does not load is a row of the table, not a crash
        return None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
    t0 = time.perf_counter()
    y = quality.measure(model, docs, n_loss=args.n_loss, n_generate=args.n_generate, seed=args.seed)
    out = y.to_json()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out, y.tokens, None


def losses(y: dict) -> str:
    return " / ".join(f"{v:.4f}" for v in y["loss"].values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "dgemma" / "assets" / "text"))
    ap.add_argument("--backends", default="cuda,mlx")
    ap.add_argument("--targets", default=",".join([*TARGETS, *LOAD_DTYPES]),
                    help=f"comma list of {', '.join([*TARGETS, *LOAD_DTYPES])}, or none")
    ap.add_argument("--n-loss", type=int, default=32, help="held-out examples for the denoising loss")
    ap.add_argument("--n-generate", type=int, default=4, help="held-out prompts generated from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write every number to this file")
    args = ap.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    targets = [] if args.targets == "none" else [t for t in args.targets.split(",") if t]
    unknown = sorted(set(targets) - set(TARGETS) - set(LOAD_DTYPES))
    if unknown:
        ap.error(f"--targets: unknown {', '.join(unknown)}; choose from {', '.join([*TARGETS, *LOAD_DTYPES])}")
    docs = quality.heldout_documents(args.model)
    report = {"model": args.model, "float": {}, "targets": {}}

    reference = {}
    print(f"{args.model}: {args.n_loss} held-out examples, {args.n_generate} generations per row")
    print("| checkpoint | backend | loss t=0.25 / 0.5 / 0.75 | tokens/forward | steps/canvas | agreement |")
    print("| --- | --- | --- | --- | --- | --- |")
    for b in backends:
        y, tokens, why = measure(args.model, b, docs, args)
        report["float"][b] = y or {"error": why}
        if y is None:
            print(f"| float32 | {b} | does not run: {why} | | | |")
            continue
        reference[b] = tokens
        print(f"| float32 | {b} | {losses(y)} | {y['tokens_per_forward']:.3f} | {y['steps_per_canvas']:.2f} | 1 |")
    if len(reference) == 2:
        a, b = (report["float"][k]["loss"] for k in backends)
        diff = max(abs(a[k] - b[k]) for k in a)
        report["float_backend_loss_diff"] = diff
        print(f"(float loss, {backends[0]} vs {backends[1]}: largest difference {diff:.2e})")

    with tempfile.TemporaryDirectory(prefix="dgemma-quality-") as tmp:
        for name in targets:
            dtype = LOAD_DTYPES.get(name)
            dst = Path(args.model) if dtype else Path(tmp) / name
            if not dtype:
                try:
                    convert(args.model, str(dst), progress=False, **TARGETS[name])
                except Exception as e:  # noqa: BLE001
                    report["targets"][name] = {"error": f"convert: {e}"}
                    print(f"| {FLAGS[name]} | - | convert failed: {e} | | | |")
                    continue
            report["targets"][name] = {}
            for b in backends:
                y, tokens, why = measure(dst, b, docs, args, dtype)
                if y is None:
                    report["targets"][name][b] = {"error": why}
                    print(f"| {FLAGS[name]} | {b} | does not run: {why} | | | |")
                    continue
                y["agreement"] = quality.agreement(tokens, reference[b]) if b in reference else None
                report["targets"][name][b] = y
                agree = "-" if y["agreement"] is None else f"{y['agreement']:.3f}"
                print(f"| {FLAGS[name]} | {b} | {losses(y)} | {y['tokens_per_forward']:.3f} | "
                      f"{y['steps_per_canvas']:.2f} | {agree} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
