"""`dgemma convert`: streaming conversion and quantization between the Hugging Face, MLX and CUDA formats.

    from dgemma.convert import convert
    report = convert("google/diffusiongemma-26B-A4B-it", "dg-mlx-4bit", to="mlx", bits=4)
    print(report.format_report())

Every weight is read from memory-mapped shards a chunk of rows (or experts) at a time, converted and written straight
to its final offset in the output shard (whose header is written first, from the plan), so peak memory is a fixed
working set (a few hundred MB) plus the interpreter, whatever the model size. The output goes to a hidden temporary
folder next to DST and is renamed into place only when complete; SRC is only read.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dgemma.checkpoint import WEIGHTS_INDEX, Checkpoint, hub_file, resolve_model_path
from dgemma.config import ModelConfig, read_json
from dgemma.errors import CheckpointError, DgemmaError, InputError

from .plan import (CHUNK_BYTES, DTYPE_ALIASES, FLOAT_ST, MAX_WORKERS, Action, Target, estimate_peak,
                   logical_from_config, numel, optional_text_tensor, plan_conversion, resolve_target, text_shapes,
                   vision_shapes)

FORMATS = ("hf", "mlx", "cuda")
MLX_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
GB = 1e9


@dataclass
class ConvertReport:
    src: str
    dst: str | None
    target: str
    source_format: str = "?"
    tensors: int = 0
    shards: int = 0
    src_bytes: int = 0
    dst_bytes: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    estimated_peak_bytes: int = 0
    dry_run: bool = False
    params: int = 0
    text_params: int = 0
    vision_params: int = 0
    choices: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return self.src_bytes / GB / self.seconds if self.seconds > 0 else float("nan")

    def format_report(self) -> str:
        lines = []
        if self.dry_run:
            lines.append(f"dry run for {self.src} ({self.params / 1e9:.2f}B parameters: text {self.text_params / 1e9:.2f}B, "
                         f"vision {self.vision_params / 1e9:.2f}B); nothing read but config.json")
            lines.append(f"  {'format':<48} {'output':>10} {'peak memory':>12}")
            for c in self.choices:
                mark = "*" if c["requested"] else " "
                lines.append(f"{mark} {c['target']:<48} {c['bytes'] / GB:>7.2f} GB {c['peak_bytes'] / GB:>9.2f} GB")
            lines.append("  (* = the conversion asked for; GB = 1e9 bytes; peak memory is the converter's estimate)")
        else:
            lines.append(f"converted {self.src} ({self.source_format}) -> {self.dst} [{self.target}]")
            lines.append(f"  {self.tensors} tensors in {self.shards} shard(s): {self.src_bytes / GB:.2f} GB read, "
                         f"{self.dst_bytes / GB:.2f} GB written in {self.seconds:.1f} s ({self.gb_per_s:.2f} GB/s)")
            lines.append(f"  peak RSS {self.peak_rss_bytes / GB:.2f} GB (estimate {self.estimated_peak_bytes / GB:.2f} GB)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


# -- arguments ---------------------------------------------------------------------------------------------------------
def make_target(to: str, bits=None, group_size=None, mixed=False, quant=None, dtype=None, rest=None) -> Target:
    to = (to or "").lower()
    if to not in FORMATS:
        raise InputError(f"--to {to!r} is not a format; choose one of {', '.join(FORMATS)}")
    if dtype is not None:
        if str(dtype).lower() not in DTYPE_ALIASES:
            raise InputError(f"--dtype {dtype!r} is not supported; choose bfloat16, float16 or float32")
        dtype = DTYPE_ALIASES[str(dtype).lower()]
    if bits is not None and to != "mlx":
        raise InputError("--bits is for --to mlx; for --to cuda use --quant fp8|int4")
    if mixed and to != "mlx":
        raise InputError("--mixed is for --to mlx")
    if quant is not None and to != "cuda":
        raise InputError("--quant is for --to cuda; for --to mlx use --bits 4|8")
    if rest is not None and not (to == "cuda" and quant == "int4"):
        raise InputError("--rest is for --to cuda --quant int4")
    if to == "mlx":
        if bits is not None:
            try:
                bits = int(bits)
            except (TypeError, ValueError):
                bits = -1
            if bits not in MLX_BITS:
                raise InputError(f"--bits {bits!r} is not supported; choose 4 or 8")
        if mixed and bits not in (None, 4):
            raise InputError("--mixed means mlx-vlm's 4-bit layout (8-bit attention, dense MLP, router and "
                             "embedding): leave out --bits (or pass --bits 4)")
        quantized = bool(bits or mixed)
        g = 64 if group_size is None else group_size
        if quantized and g not in GROUP_SIZES:
            raise InputError(f"--group-size {group_size!r} is not supported; choose 32, 64 or 128")
        return Target("mlx", bits=4 if mixed else bits, group_size=int(g), mixed=bool(mixed), dtype=dtype)
    if to == "cuda":
        if quant is not None:
            quant = str(quant).lower()
            if quant not in ("fp8", "int4"):
                raise InputError(f"--quant {quant!r} is not supported; choose fp8 or int4")
        if rest is not None:
            rest = str(rest).lower()
            if rest in ("bf16", "bfloat16", "float", "none"):
                rest = None
            elif rest != "fp8":
                raise InputError(f"--rest {rest!r} is not supported; choose fp8 or bf16")
        if quant == "int4" and group_size is not None and group_size not in GROUP_SIZES:
            raise InputError(f"--group-size {group_size!r} is not supported; choose 32, 64 or 128")
        g = int(group_size) if (quant == "int4" and group_size is not None) else None  # int4: None = fit the experts
        return Target("cuda", group_size=g, quant=quant, rest=rest, dtype=dtype)
    return Target("hf", dtype=dtype)


# -- dry run --------------------------------------------------------------------------------------------------------------
DRY_RUN_CHOICES = [Target("hf", dtype="bfloat16"), Target("mlx", dtype="bfloat16"), Target("mlx", bits=8),
                   Target("mlx", bits=4), Target("mlx", bits=4, mixed=True), Target("cuda", quant="fp8"),
                   Target("cuda", quant="int4", group_size=None),
                   Target("cuda", quant="int4", group_size=None, rest="fp8")]


def _read_config_only(src) -> tuple[dict, str]:
    p = Path(src).expanduser()
    if p.is_file():
        return read_json(p), str(p)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise CheckpointError(f"{p}: no config.json (is this a model folder?)")
        return read_json(p / "config.json"), str(p / "config.json")
    text = str(src)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return read_json(hub_file(text, "config.json")), text  # offline: the cache, or generate's one-line error
    raise CheckpointError(f"{text}: no such model folder (and not a hub id of the form 'org/name')")


def dry_run_report(raw: dict, source: str, target: Target) -> ConvertReport:
    cfg = ModelConfig.from_dict(raw, source=source)
    dtype = cfg.dtype if cfg.dtype in FLOAT_ST else "bfloat16"
    infos = logical_from_config(cfg, dtype)
    target = _resolved(target, infos)
    shapes = {i.name: i.shape for i in infos}
    text = sum(numel(s) for s in text_shapes(cfg).values())
    vision = sum(numel(s) for s in vision_shapes(raw).values())
    rep = ConvertReport(src=source, dst=None, target=target.describe(), dry_run=True, params=text + vision,
                        text_params=text, vision_params=vision)
    resolved = [t if t.dtype or t.to == "hf" or (t.to == "mlx" and not (t.bits or t.mixed)) else t for t in DRY_RUN_CHOICES]
    choices = [_resolved(t, infos) for t in resolved]
    if target not in choices:
        choices.append(target)
    for t in choices:
        plan = plan_conversion(infos, t)
        rep.choices.append({"target": t.describe() + (f" [{t.dtype}]" if t.dtype and t.to != "hf" and not (t.bits or t.mixed or t.quant) else ""),
                            "to": t.to, "bits": t.bits, "mixed": t.mixed, "quant": t.quant, "rest": t.rest,
                            "group_size": t.group_size, "bytes": plan.nbytes,
                            "peak_bytes": estimate_peak(plan.actions, shapes), "requested": t == target})
    mine = next(c for c in rep.choices if c["requested"])
    rep.dst_bytes, rep.estimated_peak_bytes = mine["bytes"], mine["peak_bytes"]
    rep.src_bytes = sum(numel(s) for s in shapes.values()) * (4 if dtype == "float32" else 2)
    return rep


# -- the conversion -------------------------------------------------------------------------------------------------------
def _check_paths(src: Path, dst: Path, force: bool) -> None:
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise InputError(f"{dst}: the destination is the source folder")
    if s in d.parents:
        raise InputError(f"{dst}: the destination is inside the source folder {src}")
    if d in s.parents:
        raise InputError(f"{dst}: the destination contains the source folder {src}")
    if d.exists() and not force:
        raise InputError(f"{dst}: already exists (pass --force to replace it)")
    if d.exists() and not d.is_dir():
        raise InputError(f"{dst}: exists and is not a folder")


def _resolved(target: Target, infos) -> Target:
    try:
        return resolve_target(target, infos)
    except ValueError as e:
        raise InputError(str(e)) from None


def _validate(source, cfg: ModelConfig) -> None:
    want = text_shapes(cfg)
    for name, shape in want.items():
        t = source.tensors.get(name)
        if t is None:
            if optional_text_tensor(name):
                continue
            raise CheckpointError(f"{source.ckpt.path}: checkpoint lacks tensor {name} (config.json implies {shape})")
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{source.file_of(t)}: tensor {name} has shape {tuple(t.shape)}, "
                                  f"config.json implies {tuple(shape)}")


def _output_config(raw: dict, plan, out_dtype: str) -> dict:
    cfg = copy.deepcopy(raw)
    for blk in (cfg, cfg.get("text_config") or {}):
        blk.pop("quantization", None)
        blk.pop("quantization_config", None)
    cfg["dtype"] = out_dtype
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = out_dtype
    if plan.quantization:
        cfg["quantization"] = plan.quantization
        cfg["quantization_config"] = plan.quantization  # mlx-lm writes both
    if plan.quantization_config:
        cfg["quantization_config"] = plan.quantization_config
    return cfg


def _carry_files(src: Path, out: Path) -> list[str]:
    carried = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.suffix == ".safetensors" or f.name in ("config.json", WEIGHTS_INDEX):
            continue
        shutil.copy2(f, out / f.name)
        carried.append(f.name)
    return carried


def _tensor_bytes(t):
    """A contiguous tensor's raw bytes as a buffer (no copy beyond the contiguous one)."""
    import torch

    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else b""


def _workers() -> int:
    """Chunks quantized at once: one per CPU available to this process (capped: memory grows with it)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_WORKERS))


def _chunks(a: Action, t):
    """(flat, [(r0, r1), ...], rows) for one action. Plain, mlx, int4 and per-expert sources are cut into rows of their
    [-1, last dim] view (the quantizers work on the last axis, and every stored part has the same leading dims), so a
    chunk of experts is a few hundred rows, not a whole 16 MB expert; fp8 sources (whose scales may be block-wise) by
    dim 0. Chunks hold about CHUNK_BYTES of float32: the working set of a chunk stays in the CPU caches."""
    shape = t.shape
    if not shape:
        return False, [(None, None)], 1
    flat = len(shape) >= 2 and t.kind in ("plain", "mlx", "int4", "experts")
    rows = numel(shape[:-1]) if flat else shape[0]
    row_elems = shape[-1] if flat else numel(shape[1:])
    step = max(1, CHUNK_BYTES // (4 * max(1, row_elems)))
    return flat, [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)], rows


def _compute(a: Action, t, source, r0, r1, flat: bool) -> list:
    """Read one chunk and convert it: the raw bytes of each output's piece (runs on a worker thread; torch releases
    the GIL in its kernels and preadv in the read)."""
    from . import quant
    from .source import TORCH_FLOAT

    out_dt = TORCH_FLOAT[a.out_dtype]
    x = source.read(t, {}, r0, r1, flat=flat)
    # x is this chunk's own fresh tensor: the quantizers may use it (or its cast) as scratch space
    if a.method == "copy":
        pieces = [x.to(out_dt) if x.is_floating_point() else x]
    elif a.method == "mlx":
        pieces = quant.mlx_quantize(x.to(out_dt), a.bits, a.group_size, out_dt, overwrite=True)
    elif a.method == "fp8":
        pieces = quant.fp8_quantize(x, overwrite=True)
    elif a.method == "int4":
        pieces = quant.int4_quantize(x, a.group_size, overwrite=True)
    else:  # pragma: no cover
        raise AssertionError(a.method)
    return [_tensor_bytes(p) for p in pieces]


def _write_rows(writer, tiles, rows: int, r0: int, data) -> None:
    """A chunk's piece (rows r0... of one computed output, as bytes) into the outputs that tile those rows in order
    (one output, or the per-expert linears of a packed expert tensor)."""
    data = memoryview(data).cast("B") if len(data) else memoryview(b"")
    per_tile = rows // len(tiles)
    row_bytes = tiles[0].nbytes // per_tile if rows else len(data)
    pos, row = 0, r0
    while pos < len(data):
        i, within = divmod(row, per_tile)
        n = min(per_tile - within, (len(data) - pos) // row_bytes)
        writer.write(tiles[i].name, within * row_bytes, data[pos:pos + n * row_bytes])
        pos, row = pos + n * row_bytes, row + n


def _run_actions(actions: list[Action], source, writer, bar, rep) -> None:
    """Convert every action, chunk by chunk: worker threads read and quantize up to 2 x workers chunks ahead while
    this thread writes finished chunks, in order, to their final offsets. torch runs single-threaded per op meanwhile
    (chunks, not ops, are spread over the cores: no per-op thread barriers, which stall badly on a busy machine)."""
    import torch
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    import gc

    workers = _workers()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the loop makes no reference cycles; full collections over torch's objects cost a few % of CPU
    pool = ThreadPoolExecutor(workers, thread_name_prefix="dgemma-convert")
    pending: deque = deque()

    def complete_one() -> None:
        kind, a, t, *rest = pending.popleft()
        if kind == "chunk":
            r0, r1, rows, fut = rest
            pieces = fut.result()
            for tiles, p in zip(a.piece_tiles(), pieces):
                _write_rows(writer, tiles, rows, r0 or 0, p)
            bar.update(t.stored_bytes * ((r1 - r0) if t.shape else 1) // rows)
            return
        for name, values in a.constants.items():
            writer.write(name, 0, np.asarray(values, dtype="<i8").tobytes())
        for o in a.outputs:
            writer.finish_tensor(o.name)
        rep.src_bytes += t.stored_bytes

    try:
        in_flight = 0
        for i, a in enumerate(actions):
            t = source.tensors[a.src]
            bar.set_postfix_str(f"tensor {i + 1}/{len(actions)}", refresh=False)
            flat, chunks, rows = _chunks(a, t)
            for r0, r1 in chunks:
                while in_flight >= 2 * workers:
                    if pending[0][0] == "chunk":
                        in_flight -= 1
                    complete_one()
                pending.append(("chunk", a, t, r0, r1, rows, pool.submit(_compute, a, t, source, r0, r1, flat)))
                in_flight += 1
            pending.append(("end", a, t))
        while pending:
            complete_one()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
        if gc_was_enabled:
            gc.enable()


def convert(src, dst=None, to: str = "hf", bits: int | None = None, group_size: int | None = None,
            mixed: bool = False, quant: str | None = None, dtype: str | None = None, force: bool = False,
            dry_run: bool = False, progress: bool = True, *, rest: str | None = None,
            shard_size_gb: float = 4.0) -> ConvertReport:
    """Convert SRC (a folder or hub id, in any supported format) to DST in format `to`:

    - "hf": plain float Hugging Face checkpoint with the original tensor names (dequantizes quantized sources);
    - "mlx": MLX layout (mlx-vlm names); `bits` 4|8 = affine quantization of every decoder linear and the experts
      (group_size 32|64|128, default 64); `mixed` = mlx-vlm's own 4-bit conversion: 8-bit (groups of 64)
      attention/dense MLPs/router/embedding, 4-bit experts and self-conditioning MLP in groups of group_size;
    - "cuda": compressed-tensors checkpoints (vLLM reads them): `quant` "fp8" (e4m3, per-output-channel scales;
      embedding, router and self-conditioning MLP stay float) or "int4" (experts int4 in groups of group_size, by
      default the largest of 128/64/32 that divides their input widths; the rest float, or FP8 with rest="fp8");
      no quant = float copy.

    `dtype` (bfloat16/float16/float32) sets the float dtype of unquantized tensors and of MLX scales/biases (default:
    the source's). Raises DgemmaError subclasses (InputError, CheckpointError, ConfigError) with a one-line message.
    """
    target = make_target(to, bits, group_size, mixed, quant, dtype, rest)
    if dry_run:
        raw, source_name = _read_config_only(src)
        rep = dry_run_report(raw, source_name, target)
        if progress:
            print(rep.format_report())
        return rep
    if dst is None:
        raise InputError("no destination folder given")
    if not (shard_size_gb > 0):
        raise InputError(f"shard size must be > 0 GB (got {shard_size_gb})")
    t0 = time.perf_counter()
    src_path = resolve_model_path(src)
    dst = Path(dst).expanduser()
    _check_paths(src_path, dst, force)
    ckpt = Checkpoint(src_path)
    from .source import Source  # torch from here on

    source = Source(ckpt)
    _validate(source, ckpt.config)
    names = sorted(source.tensors, key=lambda n: (str(source.file_of(source.tensors[n])), n))
    target = _resolved(target, [source.tensors[n].info() for n in names])
    plan = plan_conversion([source.tensors[n].info() for n in names], target)
    out_dtype = target.dtype or source.logical_dtype
    rep = ConvertReport(src=str(src), dst=str(dst), target=target.describe(), source_format=source.format,
                        tensors=len(plan.actions), dst_bytes=plan.nbytes,
                        estimated_peak_bytes=estimate_peak(plan.actions, {n: source.tensors[n].shape for n in names}))
    if source.format == "mlx" and target.to == "mlx" and (target.bits or target.mixed) and source.mlx_quant:
        rep.notes.append("re-quantizing an already quantized source adds a second rounding error")
    from .writer import ShardWriter, assign_shards

    shards = assign_shards([a.outputs for a in plan.actions], int(shard_size_gb * GB))
    rep.shards = len(shards)
    parent = dst.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(parent).free
    except OSError as e:
        raise CheckpointError(f"{parent}: cannot create the output folder ({e.strerror or e})") from None
    need = plan.nbytes + sum(f.stat().st_size for f in src_path.iterdir() if f.is_file() and f.suffix != ".safetensors")
    if need > free:
        raise CheckpointError(f"{parent}: not enough disk space: the output needs {need / GB:.2f} GB, "
                              f"{free / GB:.2f} GB free")
    tmp = parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    writer = None
    try:
        tmp.mkdir()
        writer = ShardWriter(tmp, shards)
        from tqdm.auto import tqdm

        total = sum(source.tensors[a.src].stored_bytes for a in plan.actions)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"converting to {target.to}", disable=not progress,
                  leave=False) as bar:
            _run_actions(plan.actions, source, writer, bar, rep)
        writer.write_index({"dgemma_format": target.to, "dgemma_target": target.describe()})
        (tmp / "config.json").write_text(json.dumps(_output_config(ckpt.raw_config, plan, out_dtype), indent=2) + "\n")
        _carry_files(src_path, tmp)
        if dst.exists():
            old = parent / f".{dst.name}.old-{os.getpid()}"
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException as e:
        source.close()
        if writer is not None:
            writer.close_all()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, DgemmaError):
            raise
        if isinstance(e, OSError):
            if e.errno == errno.ENOSPC:
                raise CheckpointError(f"{parent}: disk full while writing the output; nothing was written to {dst}") from None
            raise CheckpointError(f"{dst}: could not write the output ({e.strerror or e}); nothing was written") from None
        raise
    source.close()
    rep.seconds = time.perf_counter() - t0
    rep.peak_rss_bytes = peak_rss_bytes()
    if progress:
        print(rep.format_report())
    return rep
