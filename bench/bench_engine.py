"""What the one batch engine (dgemma.engine) keeps and what it costs, against the tree before it (issue 17).

    git worktree add /tmp/before a2d3f40          # the code before the engine
    python bench/bench_engine.py --before /tmp/before --threads 1     # now: this checkout (or --now DIR)

Three measurements on small random checkpoints (PyTorch CPU), every configuration in a fresh child process that
imports dgemma from the tree it measures alone (the editable install's import hook is dropped; a child that loaded a
dgemma module from elsewhere reports an error instead of a number):

1. step: wall and CPU time of one denoising pass (decoder pass, LM head, sampler step, self-conditioning) at canvas
   256, batch 1, against the prompt length, now and before. Passes are timed between the loop's own per-pass
   callbacks (`on_step`), from the second pass on (the first pays the prefill and has no self-conditioning).
2. memory: at the real vocabulary (262144) and canvas 256, batch 1 and 4: the bytes each request keeps between
   passes, summed over the arrays the loop really holds when a pass ends (before: the locals of the scheduler's
   denoising loop, which all live on into the next pass; now: everything the engine's rows and batch hold), and the
   peak RSS over the passes (VmHWM, reset with /proc/self/clear_refs once the prompt is encoded).
3. cache: time to the first canvas of a request with a 2k-token shared prefix through `Engine` with a `PromptCache`:
   cold (an empty cache) and warm (a previous request had the same prefix and another question), and with no cache.

A benchmark, not a test: it prints tables and never fails on a number.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CANVAS = 256
REAL_VOCAB = 262144

# A few hidden units, four layers (three sliding, one full, as the real model's 5:1 pattern ends on a full layer).
SMALL_TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16,
                  layer_types=["sliding_attention"] * 3 + ["full_attention"],
                  per_layer_config={"3": {"head_dim": 32, "num_key_value_heads": 1}},
                  sliding_window=128, num_experts=4, top_k_experts=2, moe_intermediate_size=32)


# == the parent: checkpoints, trees, children ========================================================================
def write_checkpoint(path: Path, vocab_size: int, max_positions: int) -> Path:
    """A random float32 checkpoint (dgemma.random_model's weights) with canvas 256, in save_pretrained's layout."""
    sys.path.insert(0, str(ROOT))
    from safetensors.numpy import save_file

    from dgemma.random_model import random_weights, tiny_text_config

    text = {**tiny_text_config(vocab_size), **SMALL_TEXT, "vocab_size": vocab_size,
            "max_position_embeddings": max_positions}
    path.mkdir(parents=True)
    config = {"architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
              "canvas_length": CANVAS, "dtype": "float32", "eos_token_id": [1], "pad_token_id": 0,
              "tie_word_embeddings": True, "text_config": text}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(random_weights(text, seed=0), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def package_view(tree: Path, into: Path) -> Path:
    """A folder whose `dgemma` package is `tree`'s, laid out as its pyproject maps it (the backends live outside
    dgemma/ in the repository, so PYTHONPATH=tree alone would pick up the installed checkout's backends)."""
    pkg = into / "dgemma"
    pkg.mkdir(parents=True)
    for entry in (tree / "dgemma").iterdir():
        (pkg / entry.name).symlink_to(entry)
    mapping = tomllib.loads((tree / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for name, folder in mapping.items():
        parts = name.split(".")
        if len(parts) == 2 and parts[0] == "dgemma":  # deeper ones (dgemma.backends.cuda) sit inside their parent
            (pkg / parts[1]).symlink_to(tree / folder)
    return into


def run_child(view: Path, tree: Path, spec: dict, threads: int, timeout: float, mem_limit_gb: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(view), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    spec = {**spec, "tree": str(tree.resolve()), "threads": threads, "mem_limit_gb": mem_limit_gb}
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over the {timeout:.0f} s limit"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:160]}"}
    return json.loads(lines[-1])


# == the child: one configuration in one tree ========================================================================
def rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def only_this_tree() -> None:
    """Drop the editable install's import hook: it would serve any module the measured tree lacks (dgemma.engine in
    the tree before the engine) from the installed checkout."""
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")
                        and not type(f).__module__.startswith("__editable__")]


def foreign_modules(tree: Path) -> list[str]:
    """Loaded dgemma modules whose file is not in `tree`."""
    return sorted(f"{name} ({m.__file__})" for name, m in list(sys.modules.items())
                  if name.split(".")[0] == "dgemma" and getattr(m, "__file__", None)
                  and not Path(m.__file__).resolve().is_relative_to(tree))


def load_backend(ckpt: str, threads: int):
    import torch

    import dgemma
    import dgemma.backends.cuda as cuda
    from dgemma.checkpoint import Checkpoint

    torch.set_num_threads(threads)
    where = {"dgemma": str(Path(dgemma.__file__).resolve()), "backend": str(Path(cuda.__file__).resolve())}
    return cuda.TorchBackend(Checkpoint(ckpt)), where


def is_engine_tree() -> bool:
    import dgemma

    return (Path(dgemma.__file__).parent / "engine").is_dir()


def settings_for(passes: int):
    """Exactly `passes` denoising passes on one canvas: never confident enough to stop early, no eos."""
    from dgemma.config import SamplerSettings

    return SamplerSettings(max_new_tokens=CANVAS, max_denoising_steps=passes, confidence_threshold=1e-30,
                           stability_threshold=1, eos_token_ids=(), pad_token_id=0)


class PassClock:
    """Wall and CPU time at each call (the loops' per-pass `on_step` hook)."""

    def __init__(self):
        self.wall, self.cpu = [time.perf_counter()], [time.process_time()]

    def __call__(self, *_):
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def passes(self) -> tuple[list[float], list[float]]:
        """Per-pass seconds from the second pass on."""
        return list(np.diff(self.wall[1:])), list(np.diff(self.cpu[1:]))


def chunked_prefill(backend, chunk: int = 256):
    """The old tree's cache built 256 tokens at a time (prefill of the first chunk, commits of the others), for
    prompts its one-pass prefill cannot hold: the state the passes read is the same shape."""
    first = backend.prefill

    def prefill(ids, mask=None):
        ids = np.asarray(ids)
        state = first(ids[:, :chunk], None if mask is None else np.asarray(mask)[:, :chunk])
        for a in range(chunk, ids.shape[1], chunk):
            backend.commit(state, ids[:, a:a + chunk])
        return state
    return prefill


def timed_prefill(backend, record: dict, after=None):
    inner = backend.prefill

    def prefill(*args, **kwargs):
        t = time.perf_counter()
        out = inner(*args, **kwargs)
        record["prefill_s"] = time.perf_counter() - t
        if after is not None:
            after()
        return out
    backend.prefill = prefill


def child_step(spec: dict) -> dict:
    backend, where = load_backend(spec["ckpt"], spec["threads"])
    V = backend.config.vocab_size
    prompt = np.random.default_rng(1).integers(8, V, spec["length"]).tolist()
    settings, clock, out = settings_for(spec["passes"]), PassClock(), {"imported": where}
    if spec.get("chunked"):
        backend.prefill = chunked_prefill(backend)
    timed_prefill(backend, out)
    clock.__init__()
    if is_engine_tree():
        from dgemma.engine import Engine, Request

        engine = Engine(backend)
        handle = engine.submit(Request(prompt_ids=prompt, settings=settings, seed=1, on_step=clock))
        for _ in engine.run([handle]):
            pass
    else:
        from dgemma.scheduler import run_blocks

        for _ in run_blocks(backend, [prompt], settings, [backend.row_noise(1)], on_step=clock):
            pass
    out["wall"], out["cpu"] = clock.passes()
    out["peak_rss_kib"] = rss_kib("VmHWM")
    return out


# -- what a loop keeps between passes -------------------------------------------------------------------------------
SKIP_TYPES = {"TorchBackend", "TorchOps", "TorchBatchCache", "KVState", "TorchRowNoise", "PromptCache", "ModelConfig",
              "SamplerSettings", "Generator", "Handle", "Engine"}


def held_arrays(roots: dict) -> dict[str, tuple[tuple, str, int]]:
    """Every torch tensor reachable from `roots` (through containers and plain objects, not through the backend, its
    cache or the noise sources), one entry per storage: name -> (shape, dtype, storage bytes)."""
    import torch

    seen_objects, seen_storage, found = set(), set(), {}

    def visit(name, obj, depth):
        if id(obj) in seen_objects or depth > 6 or callable(obj) and not isinstance(obj, torch.Tensor):
            return
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen_storage:
                seen_storage.add(storage.data_ptr())
                found[name] = (tuple(obj.shape), str(obj.dtype).replace("torch.", ""), storage.nbytes())
            return
        if type(obj).__name__ in SKIP_TYPES or isinstance(obj, (str, bytes, int, float, bool, type(None))):
            return
        if isinstance(obj, dict):
            items = obj.items()
        elif isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
            items = enumerate(obj)
        elif hasattr(obj, "__dict__") or hasattr(type(obj), "__slots__"):
            slots = getattr(type(obj), "__slots__", ())
            items = list(getattr(obj, "__dict__", {}).items()) + [(s, getattr(obj, s, None)) for s in slots]
        else:
            return
        for key, value in items:
            visit(f"{name}.{key}" if not isinstance(key, int) else f"{name}[{key}]", value, depth + 1)

    for name, obj in roots.items():
        visit(name, obj, 0)
    return found


OLD_LOOP_STATE = ("state", "sub_state", "backend", "ops", "noises", "settings", "run", "checker")


def child_memory(spec: dict) -> dict:
    backend, where = load_backend(spec["ckpt"], spec["threads"])
    V, batch = backend.config.vocab_size, spec["batch"]
    prompts = [np.random.default_rng(i).integers(8, V, spec["length"]).tolist() for i in range(batch)]
    settings, out, kept = settings_for(spec["passes"]), {"imported": where}, []

    def after_prefill():
        out["rss_before_passes_kib"] = rss_kib("VmRSS")
        reset_peak_rss()
    timed_prefill(backend, out, after_prefill)
    if is_engine_tree():
        from dgemma.engine import Engine, Request

        engine = Engine(backend)
        handles = engine.submit_group([Request(prompt_ids=p, settings=settings, seed=i) for i, p in enumerate(prompts)])
        while not all(h.done for h in handles):
            engine.step()
            if engine.rows and any(r.live for r in engine.rows):  # between two passes of the canvas
                kept.append(held_arrays({"rows": engine.rows, "batch": engine._batch, "events": engine.events}))
                out["workspace_bytes"] = workspace_bytes(backend)
    else:
        from dgemma.scheduler import run_blocks

        def on_step(*_):  # called from the denoising loop once a pass is over: its locals live on into the next
            loop = sys._getframe(1).f_locals
            kept.append(held_arrays({k: v for k, v in loop.items() if k not in OLD_LOOP_STATE}))
        for _ in run_blocks(backend, prompts, settings, [backend.row_noise(i) for i in range(batch)],
                            on_step=on_step):
            pass
    out["peak_rss_kib"] = rss_kib("VmHWM")
    last = kept[-1] if kept else {}
    out["kept_bytes"] = sum(b for _, _, b in last.values())
    by_label: dict[str, list] = {}
    for name, (shape, dtype, nbytes) in last.items():  # rows[0].soft, rows[1].soft, ... -> rows[*].soft
        entry = by_label.setdefault(re.sub(r"\[\d+\]", "[*]", name), [list(shape), dtype, 0])
        entry[2] += nbytes
    out["kept"] = dict(sorted(by_label.items(), key=lambda x: -x[1][2]))
    return out


def workspace_bytes(backend) -> int:
    """The backend's own vocabulary-sized buffers, kept between passes for the whole batch (not per request)."""
    workspace = getattr(getattr(backend.ops, "workspace", None), "_buffers", {})
    return sum(b.untyped_storage().nbytes() for b in workspace.values())


def child_cache(spec: dict) -> dict:
    from dgemma.engine import Engine, PromptCache, Request

    backend, where = load_backend(spec["ckpt"], spec["threads"])
    V = backend.config.vocab_size
    rng = np.random.default_rng(3)
    prefix = rng.integers(8, V, spec["prefix"]).tolist()
    question = lambda: rng.integers(8, V, spec["question"]).tolist()  # noqa: E731
    settings = settings_for(spec["passes"])

    def first_canvas(engine) -> dict:
        clock = PassClock()
        handle = engine.submit(Request(prompt_ids=prefix + question(), settings=settings, seed=1, on_step=clock))
        for ev in engine.run([handle]):
            if type(ev).__name__ == "CanvasEvent":
                seconds = time.perf_counter() - clock.wall[0]
        return {"seconds": seconds, "to_first_pass": clock.wall[1] - clock.wall[0],
                "cached_tokens": handle.result.cached_tokens}

    first_canvas(Engine(backend))  # warm-up: first calls of every kernel
    out = {"imported": where, "none": [], "cold": [], "warm": []}
    for _ in range(spec["reps"]):
        out["none"].append(first_canvas(Engine(backend)))
        engine = Engine(backend, prompt_cache=PromptCache(spec["budget_mb"] << 20))
        out["cold"].append(first_canvas(engine))
        out["warm"].append(first_canvas(engine))
        out["cache"] = engine.prompt_cache.stats()
    return out


def child_main(spec: dict) -> None:
    limit = int(spec["mem_limit_gb"] * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # a configuration that cannot fit fails alone
    tree = Path(spec["tree"])
    only_this_tree()
    try:
        out = {"step": child_step, "memory": child_memory, "cache": child_cache}[spec["kind"]](spec)
    except (MemoryError, RuntimeError) as e:
        out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:140]}"}
    else:
        wrong = foreign_modules(tree)
        if wrong:
            out = {"error": f"imported {wrong[0]}, outside {tree}"}
    print(json.dumps(out))


# == tables ==========================================================================================================
def ms(values) -> str:
    return f"{1000 * statistics.median(values):.0f}" if values else "-"


def step_table(results: dict, lengths: list[int], trees: list[str]) -> list[str]:
    per_tree = ("wall ms/pass", "CPU ms/pass", "prefill s", "process peak RSS MiB")
    lines = ["| prompt tokens | " + " | ".join(f"{t}: {c}" for t in trees for c in per_tree)
             + (" | now/before (wall) | now/before (CPU) |" if len(trees) == 2 else " |"),
             "|---:|" + "---:|" * (len(per_tree) * len(trees) + (2 if len(trees) == 2 else 0))]
    notes = []
    for n in lengths:
        cells, med = [], {}
        for t in trees:
            r = results[(t, n)]
            if "error" in r:
                cells += ["fails"] * len(per_tree)
                notes.append(f"{t} at {n} tokens: {r['error']}")
                continue
            tag = "*" if r.get("chunked") else ""
            cells += [ms(r["wall"]) + tag, ms(r["cpu"]) + tag, f"{r['prefill_s']:.2f}",
                      f"{r['peak_rss_kib'] / 1024:.0f}"]
            med[t] = (statistics.median(r["wall"]), statistics.median(r["cpu"]))
            if r.get("chunked"):
                notes.append(f"* {t} at {n} tokens: its one-pass prefill failed ({r['chunked']}); the cache was "
                             "built in 256-token commits instead (the passes read the same state)")
        if len(trees) == 2:
            if all(t in med for t in trees):
                cells += [f"{med['now'][0] / med['before'][0]:.2f}", f"{med['now'][1] / med['before'][1]:.2f}"]
            else:
                cells += ["-", "-"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines + [""] + notes


def mib(b: float) -> str:
    return f"{b / (1 << 20):.2f}" if b < (10 << 20) else f"{b / (1 << 20):.0f}"


def memory_table(results: dict, batches: list[int], trees: list[str]) -> list[str]:
    lines = ["| tree | batch | kept between passes, MiB per request | backend's buffers kept, MiB (whole batch) | "
             "peak RSS in the passes, MiB | RSS when the passes start, MiB | peak above that, MiB per request | "
             "largest arrays kept |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for t in trees:
        for b in batches:
            r = results[(t, b)]
            if "error" in r:
                lines.append(f"| {t} | {b} | fails: {r['error']} | | | | | |")
                continue
            peak, base = r["peak_rss_kib"] * 1024, r["rss_before_passes_kib"] * 1024
            biggest = ", ".join(f"{k} {'x'.join(map(str, s))} {d}" for k, (s, d, _) in list(r["kept"].items())[:3])
            lines.append(f"| {t} | {b} | {mib(r['kept_bytes'] / b)} | {mib(r.get('workspace_bytes', 0))} | "
                         f"{mib(peak)} | {mib(base)} | "
                         f"{mib((peak - base) / b)} | {biggest} |")
    return lines


def cache_table(r: dict, prefix: int, question: int, passes: int) -> list[str]:
    if "error" in r:
        return [f"prompt cache: fails: {r['error']}"]
    lines = [f"| prompt cache ({prefix}-token shared prefix + {question}-token question, {passes} passes) | "
             "time to first canvas, ms | of which to the first pass's end, ms | cached tokens |",
             "|---|---:|---:|---:|"]
    names = {"none": "no prompt cache", "cold": "cold (empty cache)", "warm": "warm (same prefix seen before)"}
    for key, label in names.items():
        runs = r[key]
        lines.append(f"| {label} | {ms([x['seconds'] for x in runs])} | {ms([x['to_first_pass'] for x in runs])} | "
                     f"{runs[-1]['cached_tokens']} |")
    return lines + ["", f"cache after the runs: {r['cache']}"]


def describe_tree(tree: Path) -> str:
    """The commit a checkout is at, and whether its tracked files differ from it."""
    def git(*args):
        done = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None
    head = git("rev-parse", "--short", "HEAD")
    if head is None:
        return "no git commit"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head + (" (with uncommitted changes)" if dirty else "")


# == main ============================================================================================================
def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every number must be at least 1")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", type=Path,
                   help="a checkout of the tree before the engine (git worktree add DIR a2d3f40)")
    p.add_argument("--now", type=Path, default=ROOT,
                   help="the checkout measured as now (default: the one this script is in)")
    p.add_argument("--threads", type=int, default=1, help="PyTorch threads per child process (default 1)")
    p.add_argument("--parts", default="step,memory,cache", help="which measurements, comma-separated")
    p.add_argument("--lengths", type=int_list, default="128,2048,8192,32768",
                   help="prompt lengths of the step measurement")
    p.add_argument("--passes", type=int, default=8, help="denoising passes per step run (the first is not timed)")
    p.add_argument("--batches", type=int_list, default="1,4", help="batch sizes of the memory measurement")
    p.add_argument("--memory-passes", type=int, default=3, help="denoising passes per memory run")
    p.add_argument("--vocab", type=int, default=REAL_VOCAB, help="vocabulary of the memory measurement")
    p.add_argument("--prefix", type=int, default=2048, help="shared prefix tokens of the prompt-cache measurement")
    p.add_argument("--question", type=int, default=32, help="tokens after the shared prefix")
    p.add_argument("--cache-passes", type=int, default=4, help="denoising passes of the prompt-cache requests")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each prompt-cache measurement")
    p.add_argument("--mem-limit-gb", type=float, default=12.0, help="address-space limit of each child process")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a child is given up")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is None:
        if args.threads < 1:
            p.error("--threads must be at least 1")
        for flag, tree in (("--before", args.before), ("--now", args.now)):
            if tree is not None and not (tree / "dgemma" / "__init__.py").is_file():
                p.error(f"{flag} {tree}: not a dgemma checkout (no dgemma/__init__.py)")
        unknown = set(args.parts.split(",")) - {"step", "memory", "cache"}
        if unknown:
            p.error(f"--parts: unknown part(s) {', '.join(sorted(unknown))}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        child_main(json.loads(args.child))
        return
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory(prefix="bench_engine.") as tmp:
        tmp = Path(tmp)
        now = args.now.resolve()
        trees = {"now": now} if args.before is None else {"before": args.before.resolve(), "now": now}
        views = {name: package_view(tree, tmp / f"view-{name}") for name, tree in trees.items()}

        def child(name, spec):
            r = run_child(views[name], trees[name], spec, args.threads, args.timeout, args.mem_limit_gb)
            print(f"  {name} {spec['kind']} {dict((k, v) for k, v in spec.items() if k not in ('kind', 'ckpt'))}: "
                  + (r["error"] if "error" in r else "ok " + str(r.get("imported", {}).get("backend", ""))),
                  flush=True)
            return r

        report = [f"machine: {os.cpu_count()} CPU cores (shared), PyTorch CPU, {args.threads} thread(s) per child"]
        report += [f"{name}: {tree} at {describe_tree(tree)}" for name, tree in trees.items()]
        if "step" in parts:
            lengths = args.lengths
            ckpt = write_checkpoint(tmp / "small", SMALL_TEXT["vocab_size"], max(lengths) + 2 * CANVAS)
            results = {}
            for n in lengths:
                for name in trees:
                    spec = {"kind": "step", "ckpt": str(ckpt), "length": n, "passes": args.passes}
                    r = child(name, spec)
                    if "error" in r and name == "before":
                        failed = r["error"]
                        r = child(name, {**spec, "chunked": True})
                        r["chunked"] = failed
                    results[(name, n)] = r
            report += ["", f"step time, canvas {CANVAS}, batch 1 ({args.passes - 1} timed passes, medians):",
                       *step_table(results, lengths, list(trees))]
        if "memory" in parts:
            batches = args.batches
            ckpt = write_checkpoint(tmp / "vocab", args.vocab, 4 * CANVAS)
            results = {(name, b): child(name, {"kind": "memory", "ckpt": str(ckpt), "batch": b, "length": 16,
                                               "passes": args.memory_passes})
                       for name in trees for b in batches}
            report += ["", f"memory at vocabulary {args.vocab}, canvas {CANVAS}, hidden {SMALL_TEXT['hidden_size']}:",
                       *memory_table(results, batches, list(trees))]
        if "cache" in parts:
            ckpt = write_checkpoint(tmp / "cache", SMALL_TEXT["vocab_size"], args.prefix + args.question + 4 * CANVAS)
            r = child("now", {"kind": "cache", "ckpt": str(ckpt), "prefix": args.prefix, "question": args.question,
                              "passes": args.cache_passes, "reps": args.reps, "budget_mb": 256})
            report += ["", *cache_table(r, args.prefix, args.question, args.cache_passes)]
    print("\n".join(report))


if __name__ == "__main__":
    main()
