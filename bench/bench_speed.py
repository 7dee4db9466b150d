"""Fast mode against exact mode and against the peers, in one run: speed on the same checkpoint, the per-pass overhead
of a tiny model, and fast mode's quality on the trained models (issue 19).

    python bench/bench_speed.py                          # every section, sized for a shared 2-core CPU (~20 min)
    python bench/bench_speed.py --sections speed,overhead --threads 1
    python bench/bench_speed.py --sections sudoku --n 64 --difficulties medium,hard
    python bench/bench_speed.py --sections text --json speed.json

Sections:
  speed     trained checkpoints (default: the text model in dgemma/assets/text when present, and the shipped Sudoku
            model): transformers (PyTorch CPU), dgemma exact and fast (PyTorch), mlx-vlm 0.7.10's stock
            generator, dgemma exact and fast (MLX); the same prompts, the checkpoint's own sampler settings; time per
            canvas, canvas tokens per second (canvas length / time per canvas, as DESIGN.md section 5 counts them),
            decoder passes per canvas, ms per pass (the whole wall, prefill and commit included, over the passes),
            and for dgemma the forwarded positions per pass. Ratios are against the peer of the same backend measured
            in the same run.
  overhead  a tiny random model (hidden 64, 2 layers, vocab 384) at canvas 256 and 32, a fixed number of passes per
            canvas (the stopping rule cannot fire on random weights: confidence threshold 1e-9): ms per decoder pass
            for every runner above. Random weights freeze nothing in fast mode, so its row is exact's work plus its
            bookkeeping.
  sudoku    the shipped Sudoku model (PyTorch): solve rate and mean steps on held-out medium and hard puzzles for
            exact mode and a grid of fast policies (--freeze-after x --refresh-every), the plain sampler and the
            checker's re-noising (constraint-aware sampling, as `dgemma sudoku` runs it).
  text      the text model of dgemma/assets/text (PyTorch), if present: its yardstick (dgemma.quality.measure) in
            exact mode, and per fast policy the generation half of the yardstick (tokens per forward, steps per
            canvas), token agreement with exact mode's generations (same seeds) and tok/s both ways.

Fast mode's forwarded positions are read by wrapping Engine._active_positions (a pass forwards its widest row's active
positions; a full pass forwards the whole canvas). This is a benchmark: it prints numbers and never fails on them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import dgemma  # noqa: E402
from dgemma.engine import FastPolicy  # noqa: E402
from dgemma.engine.engine import Engine  # noqa: E402

TEXT_MODEL = ROOT / "dgemma" / "assets" / "text"
SUDOKU_MODEL = ROOT / "dgemma" / "assets" / "sudoku"
TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, sliding_window=32,
            num_experts=8, top_k_experts=2, moe_intermediate_size=32, max_position_embeddings=4096,
            layer_types=["sliding_attention", "full_attention"])


# == measuring =========================================================================================================
class PassMeter:
    """Counts the engine's decoder passes and what each forwards: the pass width (positions per row the decoder
    runs over) and the active positions per live row (the rest of a row's width is padding)."""

    def __init__(self):
        self.widths: list[int] = []
        self.actives: list[float] = []
        self.rows: list[int] = []  # rows computed by each pass (live or idle)

    @contextlib.contextmanager
    def watching(self):
        original = Engine._active_positions
        meter = self

        def wrapped(engine, rows):
            got = original(engine, rows)
            C = engine.cfg.canvas_length
            live = [j for j, r in enumerate(rows) if r.live]
            meter.rows.append(len(rows))
            if got is None:
                meter.widths.append(C)
                meter.actives.append(float(C))
            else:
                idx, used = got
                meter.widths.append(idx.shape[1])
                meter.actives.append(float(np.mean([used[j].sum() for j in live])) if live else 0.0)
            return got

        Engine._active_positions = wrapped
        try:
            yield self
        finally:
            Engine._active_positions = original

    def summary(self) -> dict:
        if not self.widths:
            return {"passes": 0, "width": float("nan"), "active": float("nan")}
        return {"passes": len(self.widths), "width": float(np.mean(self.widths)),
                "active": float(np.mean(self.actives)),
                "forwarded": int(np.dot(self.widths, self.rows))}  # positions the decoder ran over, padding included


def fast_policy(text: str) -> FastPolicy:
    """'fa2-r8' -> FastPolicy(freeze_after=2, refresh_every=8) (freeze_entropy from --freeze-entropy)."""
    fa, r = text.split("-")
    return FastPolicy(freeze_after=int(fa[2:]), refresh_every=int(r[1:]), freeze_entropy=ARGS.freeze_entropy)


def policy_name(p: FastPolicy | None) -> str:
    return "exact" if p is None else f"fast fa{p.freeze_after}-r{p.refresh_every}-e{p.freeze_entropy:g}"


def median_time(fn, reps: int, warm=None):
    """(median wall seconds, the last call's result) over `reps` calls after one untimed warm-up (`warm`, else
    `fn`)."""
    (warm or fn)()
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


# == the runners: each returns (canvases, decoder passes, forwarded width per pass, active per row) ==================
def run_dgemma(model, prompts, sampler, policy, seed=0):
    meter = PassMeter()
    kw = {} if policy is None else {"speed": "fast", "fast": policy}
    with meter.watching():
        gens = [model.generate(p, seed=seed + i, **kw, **sampler) for i, p in enumerate(prompts)]
    s = meter.summary()
    return sum(len(g.stats.steps_per_canvas) for g in gens), s["passes"], s["width"], s["active"]


def reference_runner(path, C, sampler):
    """transformers' own generate on the checkpoint (its own sampler and noise), decoder calls counted by a hook."""
    import torch
    from reference import load_reference

    ref = load_reference(path)
    calls = [0]
    ref.model.decoder.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    def run(prompts):
        calls[0], canvases = 0, 0
        with torch.inference_mode():
            for p in prompts:
                out = ref.generate(torch.tensor([p]), max_new_tokens=sampler["max_new_tokens"],
                                   max_denoising_steps=sampler["max_denoising_steps"],
                                   eos_token_id=sampler["eos_token_ids"] or [-1], pad_token_id=0)
                canvases += -(-(out.sequences.shape[1] - len(p)) // C)
        return canvases, calls[0], float(C), float(C)

    return run


class _Detok:
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


class _Tokenizer:
    """The tokenizer surface mlx-vlm's generator touches (stopping on the checkpoint's eos)."""

    def __init__(self, eos):
        self.detokenizer = _Detok()
        self.stopping_criteria = _Stop(eos)


def mlx_vlm_runner(path, C, sampler, gen_config):
    """mlx-vlm 0.7.10's stock generator (entropy-bound sampler, full canvas) on the checkpoint's weights."""
    import mlx.core as mx
    from mlx_vlm.models.diffusion_gemma import Model, ModelConfig

    raw = json.loads((Path(path) / "config.json").read_text())
    vcfg = ModelConfig.from_dict(raw)
    # mlx-vlm 0.7.10 reads the full-attention head shape only from global_head_dim / num_global_key_value_heads.
    for over in (raw["text_config"].get("per_layer_config") or {}).values():
        vcfg.text_config.global_head_dim = over.get("head_dim", vcfg.text_config.global_head_dim)
        vcfg.text_config.num_global_key_value_heads = over.get("num_key_value_heads",
                                                              vcfg.text_config.num_global_key_value_heads)
    vcfg.generation_config = dict(gen_config, max_denoising_steps=sampler["max_denoising_steps"])
    vlm = Model(vcfg)
    weights = vlm.sanitize(mx.load(str(Path(path) / "model.safetensors")))
    vlm.load_weights(list(weights.items()), strict=False)
    mx.eval(vlm.parameters())
    tok = _Tokenizer(sampler["eos_token_ids"])

    def run(prompts):
        canvases, passes = 0, 0
        for p in prompts:
            stats = {}
            vlm.generate(mx.array([p]), tokenizer=tok, processor=tok, gen_length=sampler["max_new_tokens"],
                         max_denoising_steps=sampler["max_denoising_steps"], temperature=1.0,
                         diffusion_sampler="entropy-bound", diffusion_full_canvas=True, stats=stats)
            canvases += max(1, -(-int(stats.get("diffusion_canvas_tokens", C)) // C))
            passes += int(stats.get("diffusion_denoising_steps", 0))
        return canvases, passes, float(C), float(C)

    return run


def runners(path, C, sampler, gen_config, policy, backends):
    """name -> (backend label, peer name, runner(prompts))."""
    out = {}
    if "cuda" in backends:
        try:
            out["transformers"] = ("PyTorch", None, reference_runner(path, C, sampler))
        except Exception as e:  # pragma: no cover - peer optional
            print(f"  transformers: skipped ({type(e).__name__}: {e})")
        torch_model = dgemma.load(path, backend="cuda")
        out["dgemma exact (torch)"] = ("PyTorch", "transformers",
                                       lambda ps: run_dgemma(torch_model, ps, sampler, None))
        out["dgemma fast (torch)"] = ("PyTorch", "transformers",
                                      lambda ps: run_dgemma(torch_model, ps, sampler, policy))
    if "mlx" in backends:
        try:
            out["mlx-vlm 0.7.10 stock"] = ("MLX", None, mlx_vlm_runner(path, C, sampler, gen_config))
        except Exception as e:  # pragma: no cover - peer optional
            print(f"  mlx-vlm: skipped ({type(e).__name__}: {e})")
        mlx_model = dgemma.load(path, backend="mlx")
        out["dgemma exact (mlx)"] = ("MLX", "mlx-vlm 0.7.10 stock", lambda ps: run_dgemma(mlx_model, ps, sampler, None))
        out["dgemma fast (mlx)"] = ("MLX", "mlx-vlm 0.7.10 stock",
                                    lambda ps: run_dgemma(mlx_model, ps, sampler, policy))
    return out


def time_runners(table, prompts, C, reps) -> list[dict]:
    rows = {}
    for name, (backend, peer, run) in table.items():
        wall, (canvases, passes, width, active) = median_time(lambda: run(prompts), reps,
                                                             lambda: run(prompts[:1]))
        per_canvas = wall / max(canvases, 1)
        rows[name] = {"runner": name, "backend": backend, "peer": peer, "canvases": canvases, "passes": passes,
                      "passes_per_canvas": passes / max(canvases, 1), "s_per_canvas": per_canvas,
                      "tok_s": C / per_canvas, "ms_per_pass": 1e3 * wall / max(passes, 1),
                      "width": width, "active": active}
        print(f"    {name}: {per_canvas:.3f} s/canvas, {passes} passes", file=sys.stderr, flush=True)
    for r in rows.values():
        peer = rows.get(r["peer"]) if r["peer"] else None
        r["vs_peer"] = peer["s_per_canvas"] / r["s_per_canvas"] if peer else None
        r["vs_peer_per_pass"] = peer["ms_per_pass"] / r["ms_per_pass"] if peer else None
        exact = rows.get(r["runner"].replace("fast", "exact"))
        r["vs_exact"] = exact["s_per_canvas"] / r["s_per_canvas"] if exact and "fast" in r["runner"] else None
    return list(rows.values())


def fmt_ratio(x) -> str:
    return "" if x is None else f"{x:.2f}x"


def print_speed_table(rows, title):
    print(f"\n{title}")
    print("| runner | s / canvas | canvas tok/s | passes / canvas | ms / pass | forwarded / pass (active / row) "
          "| vs peer (end to end) | vs peer (per pass) | fast vs exact |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fwd = f"{r['width']:.1f} ({r['active']:.1f})"
        print(f"| {r['runner']} | {r['s_per_canvas']:.3f} | {r['tok_s']:.1f} | {r['passes_per_canvas']:.1f} "
              f"| {r['ms_per_pass']:.2f} | {fwd} | {fmt_ratio(r['vs_peer'])} | {fmt_ratio(r['vs_peer_per_pass'])} "
              f"| {fmt_ratio(r['vs_exact'])} |")


# == sections ==========================================================================================================
def checkpoint_prompts(path: Path, n: int) -> tuple[list[list[int]], str]:
    """Held-out prompts for a trained checkpoint: text prompts of 16 tokens, or Sudoku puzzles."""
    model = dgemma.load(path, backend="cuda")
    if (path / "heldout.jsonl").exists():
        from dgemma import quality

        docs = quality.heldout_documents(path)
        gp, _, gv = quality.heldout_examples(model, docs, n, 16, seed=quality.EXAMPLE_SEED + 1)
        return [list(map(int, r[v])) for r, v in zip(gp, gv)], "held-out text prompts of 16 tokens"
    from dgemma.tasks.sudoku.task import encode_prompt, held_out_puzzles

    return [encode_prompt(p) for p, _ in held_out_puzzles("medium", n)], "held-out medium puzzles"


def section_speed(results):
    paths = [Path(c) for c in ARGS.checkpoint.split(",")] if ARGS.checkpoint else \
        [p for p in (TEXT_MODEL, SUDOKU_MODEL) if (p / "config.json").exists()]
    results["speed"] = [speed_on(path) for path in paths]


def speed_on(path: Path) -> dict:
    model = dgemma.load(path, backend="cuda")
    C, s = model.config.canvas_length, model.sampler_defaults
    canvases = ARGS.canvases if (path / "heldout.jsonl").exists() else 1
    sampler = {"max_new_tokens": canvases * C, "max_denoising_steps": s.max_denoising_steps,
               "eos_token_ids": list(s.eos_token_ids)}
    gen_config = json.loads((path / "generation_config.json").read_text())
    prompts, what = checkpoint_prompts(path, ARGS.speed_prompts)
    policy = fast_policy(ARGS.policy)
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    print(f"\n## speed: {name} (canvas {C}, vocab {model.config.vocab_size}, {model.config.num_hidden_layers} "
          f"layers, hidden {model.config.hidden_size}); {len(prompts)} {what}, batch 1 each, up to "
          f"{sampler['max_new_tokens']} new tokens, <= {s.max_denoising_steps} steps/canvas, eos "
          f"{sampler['eos_token_ids']}; {policy_name(policy)}; median of {ARGS.reps} after a warm-up on the first "
          "prompt")
    table = runners(path, C, sampler, gen_config, policy, ARGS.backends)
    rows = time_runners(table, prompts, C, ARGS.reps)
    print_speed_table(rows, f"speed on {path.name} (canvas {C})")
    return {"checkpoint": str(path), "canvas": C, "rows": rows}


def tiny_checkpoint(C: int) -> Path:
    from reference import make_checkpoint

    path = Path(tempfile.mkdtemp(prefix="bench_speed_")) / f"tiny-{C}"
    make_checkpoint(path, canvas_length=C, scale=0.5, **TINY)
    (path / "generation_config.json").write_text(json.dumps(
        {"max_denoising_steps": ARGS.overhead_steps, "t_min": 0.4, "t_max": 0.8,
         "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"}, "stability_threshold": 1,
         "confidence_threshold": 1e-9, "eos_token_id": [1], "pad_token_id": 0}))
    return path


def section_overhead(results):
    print(f"\n## overhead: tiny random model ({TINY['hidden_size']} hidden, {TINY['num_hidden_layers']} layers, vocab "
          f"{TINY['vocab_size']}), one canvas of {ARGS.overhead_steps} passes (confidence threshold 1e-9), prompt 32, "
          f"batch 1; eos off")
    results["overhead"] = {}
    for C in (256, 32):
        path = tiny_checkpoint(C)
        gen_config = json.loads((path / "generation_config.json").read_text())
        sampler = {"max_new_tokens": C, "max_denoising_steps": ARGS.overhead_steps, "eos_token_ids": []}
        prompt = [list(np.random.default_rng(0).integers(3, TINY["vocab_size"], 32))]
        prompt = [list(map(int, prompt[0]))]
        table = runners(path, C, sampler, gen_config, fast_policy(ARGS.policy), ARGS.backends)
        rows = time_runners(table, prompt, C, ARGS.reps)
        print_speed_table(rows, f"overhead at canvas {C}")
        results["overhead"][C] = rows


def sudoku_cell(model, puzzles, policy, constraints):
    from dgemma.tasks.sudoku.task import solve_puzzles

    kw = {} if policy is None else {"speed": "fast", "fast": policy}
    meter = PassMeter()
    t0 = time.perf_counter()
    with meter.watching():
        res = solve_puzzles(model, puzzles, seed=0, constraints=constraints, max_retries=0, batch_size=ARGS.batch,
                            max_new_tokens=model.config.canvas_length, **kw)
    wall = time.perf_counter() - t0
    m = meter.summary()
    return {"solved": float(np.mean([r.solved for r in res])), "mean_steps": float(np.mean([r.steps for r in res])),
            "s_per_puzzle": wall / len(puzzles), "width": m["width"], "active": m["active"],
            "forwarded_per_puzzle": m.get("forwarded", 0) / len(puzzles)}


def section_sudoku(results):
    from dgemma.tasks.sudoku.task import held_out_puzzles

    model = dgemma.load(SUDOKU_MODEL, backend="cuda")
    policies = [None] + [fast_policy(f"fa{a}-r{r}") for a in ARGS.freeze_after for r in ARGS.refresh_every]
    modes = {"plain": False, "renoise": True}
    print(f"\n## sudoku: the shipped model (PyTorch), {ARGS.n} held-out puzzles per difficulty "
          f"(dgemma.tasks.sudoku.task.held_out_puzzles, default seed), puzzle i sampled with seed i, batches of "
          f"{ARGS.batch}; plain = sampler alone, renoise = checker re-noising + stop when solved, no retries; the "
          f"renoise grid runs exact and {ARGS.policy} only")
    rows = []
    for d in ARGS.difficulties:
        puzzles = [p for p, _ in held_out_puzzles(d, ARGS.n)]
        for mode, constraints in modes.items():
            for p in policies if mode == "plain" else [None, fast_policy(ARGS.policy)]:
                row = {"difficulty": d, "mode": mode, "policy": policy_name(p),
                       **sudoku_cell(model, puzzles, p, constraints)}
                rows.append(row)
                print(f"    {d} {mode} {row['policy']}: {100 * row['solved']:.1f}%, {row['mean_steps']:.1f} steps",
                      file=sys.stderr, flush=True)
    exact = {(r["difficulty"], r["mode"]): r for r in rows if r["policy"] == "exact"}
    print("\n| difficulty | mode | policy | solved % | vs exact (points) | mean steps | s / puzzle | speed-up "
          "| forwarded / pass (active / row) | forwarded / puzzle | work vs exact |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        e = exact[(r["difficulty"], r["mode"])]
        r["delta_points"] = 100 * (r["solved"] - e["solved"])
        r["speedup"] = e["s_per_puzzle"] / r["s_per_puzzle"]
        print(f"| {r['difficulty']} | {r['mode']} | {r['policy']} | {100 * r['solved']:.1f} | {r['delta_points']:+.1f} "
              f"| {r['mean_steps']:.1f} | {r['s_per_puzzle']:.3f} | {r['speedup']:.2f}x "
              f"| {r['width']:.1f} ({r['active']:.1f}) | {r['forwarded_per_puzzle']:.0f} "
              f"| {r['forwarded_per_puzzle'] / e['forwarded_per_puzzle']:.2f} |")
    results["sudoku"] = rows


def text_generation(model, prompts, policy, batch: int):
    """(generations, wall seconds, meter summary) over `prompts`, `batch` per generate_batch call; prompt i's noise
    is ScriptedNoise(i), as the yardstick's generation draws it (dgemma.quality.generation_stats)."""
    from dgemma.sampler import ScriptedNoise

    kw = {} if policy is None else {"speed": "fast", "fast": policy}
    meter, gens = PassMeter(), []
    t0 = time.perf_counter()
    with meter.watching():
        for a in range(0, len(prompts), batch):
            noises = [ScriptedNoise(i, model.backend.ops) for i in range(a, min(a + batch, len(prompts)))]
            gens += model.generate_batch(prompts[a:a + batch], noises=noises, **kw)
    return gens, time.perf_counter() - t0, meter.summary()


def section_text(results):
    if not (TEXT_MODEL / "config.json").exists():
        print("\n## text: no dgemma/assets/text yet (skipped)")
        return
    from dgemma import quality

    model = dgemma.load(TEXT_MODEL, backend="cuda")
    C = model.config.canvas_length
    note = (TEXT_MODEL / "TRAINING.md").read_text().strip().splitlines()
    yard = quality.measure(model, n_loss=ARGS.text_loss, n_generate=ARGS.text_prompts)
    docs = quality.heldout_documents(TEXT_MODEL)
    gp, _, gv = quality.heldout_examples(model, docs, ARGS.text_prompts, 16, seed=quality.EXAMPLE_SEED + 1)
    prompts = [list(map(int, r[v])) for r, v in zip(gp, gv)]
    print(f"\n## text: dgemma/assets/text (canvas {C}, vocab {model.config.vocab_size}; TRAINING.md: "
          f"{note[0] if note else '(empty)'}), PyTorch; yardstick (exact): loss {fmt_losses(yard.loss)}, accuracy "
          f"{fmt_losses(yard.accuracy)}, tokens/forward {yard.tokens_per_forward:.2f}, steps/canvas "
          f"{yard.steps_per_canvas:.1f} ({ARGS.text_loss} loss examples, {ARGS.text_prompts} generation prompts). "
          "The losses are one decoder pass over a noisy canvas: the same in both speeds by construction; fast mode "
          "changes the generation half. Generation: the yardstick's prompts and noise (ScriptedNoise(i)), default "
          "sampler, batch "
          f"{ARGS.text_batch} and batch 1")
    policies = [None] + [fast_policy(p) for p in ARGS.text_policies]
    rows, ref_tokens = [], None
    for p in policies:
        gens, wall, m = text_generation(model, prompts, p, ARGS.text_batch)
        tokens = [list(g.token_ids) for g in gens]
        passes = sum(g.stats.decoder_passes for g in gens)
        non_pad = sum(g.stats.tokens_per_forward * g.stats.decoder_passes for g in gens)
        canvases = sum(len(g.stats.steps_per_canvas) for g in gens)
        _, wall1, _ = text_generation(model, prompts[:ARGS.text_solo], p, 1)
        ref_tokens = tokens if p is None else ref_tokens
        row = {"policy": policy_name(p), "tokens_per_forward": non_pad / max(passes, 1),
               "steps_per_canvas": float(np.mean([s for g in gens for s in g.stats.steps_per_canvas])),
               "agreement": quality.agreement(tokens, ref_tokens), "tok_s_batch": canvases * C / wall,
               "tok_s_solo": sum(len(g.stats.steps_per_canvas) for g in gens[:ARGS.text_solo]) * C / wall1,
               "width": m["width"], "active": m["active"]}
        rows.append(row)
        print(f"    text {row['policy']}: agreement {row['agreement']:.3f}", file=sys.stderr, flush=True)
    print(f"\n| policy | tokens / forward | steps / canvas | agreement with exact | canvas tok/s (batch "
          f"{ARGS.text_batch}) | vs exact | canvas tok/s (batch 1, {ARGS.text_solo} prompts) | vs exact "
          "| forwarded / pass (active / row) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        r["vs_exact_batch"] = r["tok_s_batch"] / rows[0]["tok_s_batch"]
        r["vs_exact_solo"] = r["tok_s_solo"] / rows[0]["tok_s_solo"]
        print(f"| {r['policy']} | {r['tokens_per_forward']:.2f} | {r['steps_per_canvas']:.1f} | {r['agreement']:.3f} "
              f"| {r['tok_s_batch']:.1f} | {r['vs_exact_batch']:.2f}x | {r['tok_s_solo']:.1f} "
              f"| {r['vs_exact_solo']:.2f}x | {r['width']:.1f} ({r['active']:.1f}) |")
    results["text"] = {"yardstick": yard.to_json(), "rows": rows}


def fmt_losses(d: dict) -> str:
    return ", ".join(f"t={k:g}: {v:.3f}" for k, v in d.items())


SECTIONS = {"speed": section_speed, "overhead": section_overhead, "sudoku": section_sudoku, "text": section_text}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="speed,overhead,sudoku,text", help="comma-separated: " + ",".join(SECTIONS))
    ap.add_argument("--backends", default="cuda,mlx", help="speed and overhead: cuda (PyTorch), mlx")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--checkpoint", help="speed: comma-separated trained checkpoints (default: the text model and "
                    "the Sudoku model)")
    ap.add_argument("--policy", default="fa2-r8", help="the fast policy of the speed/overhead/renoise runs: "
                    "faA-rR = freeze_after A, refresh_every R")
    ap.add_argument("--freeze-entropy", type=float, default=0.05)
    ap.add_argument("--speed-prompts", type=int, default=2)
    ap.add_argument("--canvases", type=int, default=1, help="speed on a text model: canvases per generation")
    ap.add_argument("--reps", type=int, default=1, help="timed repetitions after the warm-up")
    ap.add_argument("--overhead-steps", type=int, default=16)
    ap.add_argument("--n", type=int, default=32, help="sudoku: held-out puzzles per difficulty")
    ap.add_argument("--difficulties", default="medium,hard")
    ap.add_argument("--batch", type=int, default=32, help="sudoku: puzzles per batch")
    ap.add_argument("--freeze-after", default="1,2,3")
    ap.add_argument("--refresh-every", default="0,4,8")
    ap.add_argument("--text-policies", default="fa1-r0,fa2-r8,fa2-r4,fa3-r8")
    ap.add_argument("--text-prompts", type=int, default=8)
    ap.add_argument("--text-loss", type=int, default=16)
    ap.add_argument("--text-batch", type=int, default=8)
    ap.add_argument("--text-solo", type=int, default=2, help="text: prompts timed at batch 1")
    ap.add_argument("--json", help="also write every table here")
    args = ap.parse_args()
    args.sections = [s for s in args.sections.split(",") if s]
    if any(s not in SECTIONS for s in args.sections):
        ap.error(f"--sections: each of {','.join(SECTIONS)}")
    args.backends = [b for b in args.backends.split(",") if b]
    args.difficulties = [d for d in args.difficulties.split(",") if d]
    args.freeze_after = [int(x) for x in args.freeze_after.split(",") if x]
    args.refresh_every = [int(x) for x in args.refresh_every.split(",") if x]
    args.text_policies = [p for p in args.text_policies.split(",") if p]
    return args


def main():
    global ARGS
    ARGS = parse_args()
    try:
        for p in [ARGS.policy] + ARGS.text_policies:
            fast_policy(p)
    except (ValueError, IndexError):
        print("error: --policy / --text-policies: each is faA-rR (freeze_after A >= 1, refresh_every R >= 0)",
              file=sys.stderr)
        raise SystemExit(2)
    import torch

    torch.set_num_threads(ARGS.threads)
    import mlx.core as mx

    print(f"bench_speed: torch {torch.__version__} ({ARGS.threads} thread(s)), MLX {mx.__version__} on "
          f"{mx.default_device()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    results = {}
    for name in ARGS.sections:
        t0 = time.perf_counter()
        SECTIONS[name](results)
        print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps(results, indent=2, default=str))


ARGS = None

if __name__ == "__main__":
    main()
