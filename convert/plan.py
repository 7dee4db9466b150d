"""What a conversion writes, decided from names and shapes alone (no torch, no weights read).

The converter works on *logical* tensors: the Hugging Face name, shape and float dtype of every weight, whatever
format the source stores it in. A `Target` maps each logical tensor onto the tensors the output format stores for it;
the same plan gives the exact output size (dry run), the safetensors headers (written before any data) and the shards.

Output tensor naming (documented in the README of the convert command):

hf     the original names (`model.decoder.layers.N.experts.gate_up_proj`, ...), plain float.
mlx    what mlx-vlm 0.7.10's DiffusionGemma `sanitize()` produces, so the folder loads in mlx-vlm and mlx-lm-style
       loaders without renaming: the original names, except that the packed experts get a `.weight` suffix
       (`...experts.gate_up_proj.weight` [E, 2I, H], `...experts.down_proj.weight` [E, H, I]; they are SwitchLinear
       modules). A quantized module `P` stores `P.weight` (uint32, 32/bits values per word along the input axis),
       `P.scales` and `P.biases` ([..., in / group_size], the float dtype); config.json gets mlx-lm's `quantization`
       block ({group_size, bits, mode: affine} plus `P: {group_size, bits}` for every module whose bits differ from the
       default) and its copy `quantization_config`. MLX needs the input dim to be a multiple of the group size: with
       group 128 the experts' down_proj (input 704) stays unquantized, as mlx-lm does (the dry run shows the cost).
cuda   compressed-tensors' own layout, what vLLM reads (its config.json `quantization_config`, quant_method
       "compressed-tensors"). A quantized linear `P` (attention q/k/v/o, dense MLP gate/up/down; the self-conditioning
       MLP, embedding and router stay float: vLLM's DiffusionGemma has no quantized module for them) stores, in FP8,
       `P.weight` float8_e4m3fn + `P.weight_scale` float32 [out, 1] (per output channel; activations quantized per
       token at run time: "float-quantized"). The packed experts are split into the per-expert linears
       `...experts.E.{gate,up,down}_proj` that vLLM's Gemma 4 loader and llm-compressor use (gate = the first half of
       gate_up_proj's rows), each stored like `P`; in int4 ("pack-quantized", W4A16) as `P.weight_packed` int32
       [out, in / 8] (eight values per word, the first in the lowest bits, each q + 8), `P.weight_scale` bfloat16
       [out, in / group] (symmetric: w = q * scale, q in [-8, 7]) and `P.weight_shape` int64 [2].
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from dgemma.weights import is_optional, text_tensor_shapes

ST_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1, "I8": 1, "U16": 2,
            "I16": 2, "U32": 4, "I32": 4, "I64": 8, "U64": 8, "BOOL": 1}
FLOAT_ST = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
ST_FLOAT = {v: k for k, v in FLOAT_ST.items()}
DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "f32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                 "float16": "float16", "fp16": "float16", "f16": "float16"}

EXPERT_RE = re.compile(r".*\.experts\.(gate_up_proj|down_proj)$")
LINEAR_RE = re.compile(
    r"^model\.decoder\.(embed_tokens|self_conditioning\.(gate|up|down)_proj|"
    r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|router\.proj))\.weight$"
)


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def role(name: str) -> str:
    """embed | attn | mlp | router | selfcond | expert | other (norms, scalars, vision tower)."""
    if EXPERT_RE.fullmatch(name) and name.startswith("model.decoder."):
        return "expert"
    m = LINEAR_RE.match(name)
    if not m:
        return "other"
    inner = m.group(1)
    if inner == "embed_tokens":
        return "embed"
    if inner.startswith("self_conditioning"):
        return "selfcond"
    if ".self_attn." in inner:
        return "attn"
    if ".router." in inner:
        return "router"
    return "mlp"


def module_path(name: str) -> str:
    """The module that owns a logical weight (the key of mlx-lm's per-module quantization overrides)."""
    return name if role(name) == "expert" else name[: -len(".weight")]


@dataclass(frozen=True)
class Target:
    to: str                       # hf | mlx | cuda
    bits: int | None = None       # mlx: 4 | 8 (default for quantized modules); None = plain float
    group_size: int | None = 64  # cuda int4: None until resolved (`resolve_target`)
    mixed: bool = False           # mlx: mlx-vlm's 4-bit layout (8-bit attention / dense MLPs / router / embedding)
    quant: str | None = None      # cuda: fp8 | int4
    rest: str | None = None       # cuda int4: None (float) | fp8 (the non-expert linears)
    dtype: str | None = None      # float dtype of unquantized tensors, scales and biases; None = the source's

    def describe(self) -> str:
        if self.to == "mlx":
            if self.mixed:
                return f"mlx mixed 4/8-bit, group {self.group_size}"
            return f"mlx {self.bits}-bit, group {self.group_size}" if self.bits else "mlx (float)"
        if self.to == "cuda":
            if self.quant == "fp8":
                return "cuda fp8 (e4m3, per-channel scales)"
            if self.quant == "int4":
                group = self.group_size or "auto"
                return f"cuda int4 experts (group {group}) + {'fp8' if self.rest == 'fp8' else 'float'} rest"
            return "cuda (float)"
        return "hf (float)"


@dataclass
class OutTensor:
    name: str
    dtype: str                    # safetensors code
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * ST_BYTES[self.dtype]


@dataclass
class Action:
    src: str                      # logical name
    method: str                   # copy | mlx | fp8 | int4
    outputs: list[OutTensor]
    bits: int | None = None
    group_size: int | None = None
    out_dtype: str = "bfloat16"   # float dtype of copies / scales / biases
    tiles: list[list[OutTensor]] | None = None  # per computed piece, the outputs that tile its rows ([-1, last dim]
                                                # view) in order; None: one output per piece
    constants: dict[str, tuple[int, ...]] = field(default_factory=dict)  # int64 outputs with fixed values

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    def piece_tiles(self) -> list[list[OutTensor]]:
        return self.tiles or [[o] for o in self.outputs if o.name not in self.constants]


@dataclass
class LogicalInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str                    # float dtype name, or a safetensors code for non-float tensors


@dataclass
class Plan:
    target: Target
    actions: list[Action] = field(default_factory=list)
    quantization: dict | None = None           # mlx-lm block
    quantization_config: dict | None = None    # cuda block

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.actions)


# --mixed is mlx-vlm's own 4-bit conversion of this model (`mlx_vlm.convert(..., quantize=True, q_bits=4)`): its
# DiffusionGemma quant_predicate keeps the embedding, attention, dense MLP and router at 8 bits in groups of 64
# whatever the group size asked for, and everything else it can quantize (the experts and the self-conditioning MLP)
# at the default bits. Matching it bit for bit makes our folders interchangeable with the community's (tested).
MIXED_HIGH = {"embed", "attn", "mlp", "router"}
MIXED_HIGH_BITS, MIXED_HIGH_GROUP = 8, 64


def _mlx_bits(target: Target, r: str) -> tuple[int | None, int]:
    """(bits, group size) of one role; bits None = not quantized."""
    if r == "other":
        return None, target.group_size
    if target.mixed and r in MIXED_HIGH:
        return MIXED_HIGH_BITS, MIXED_HIGH_GROUP
    return (4 if target.mixed else target.bits), target.group_size


def plan_conversion(tensors: list[LogicalInfo], target: Target) -> Plan:
    plan = Plan(target)
    quant_overrides: dict[str, dict] = {}
    default_bits = 4 if target.mixed else target.bits
    fp8_linears = target.to == "cuda" and (target.quant == "fp8" or (target.quant == "int4" and target.rest == "fp8"))
    for t in tensors:
        out_dtype = target.dtype or (t.dtype if t.dtype in FLOAT_ST else "bfloat16")
        is_float = t.dtype in FLOAT_ST
        r = role(t.name) if is_float else "other"
        keep_dtype = FLOAT_ST[out_dtype] if is_float else t.dtype
        if target.to == "mlx":
            name = t.name + ".weight" if r == "expert" else t.name
            bits, group = _mlx_bits(target, r) if (target.bits or target.mixed) else (None, target.group_size)
            if bits and t.shape[-1] % group == 0 and len(t.shape) >= 2:
                base = module_path(t.name)
                K = t.shape[-1]
                lead = tuple(t.shape[:-1])
                fd = FLOAT_ST[out_dtype]
                outs = [OutTensor(base + ".weight", "U32", lead + (K * bits // 32,)),
                        OutTensor(base + ".scales", fd, lead + (K // group,)),
                        OutTensor(base + ".biases", fd, lead + (K // group,))]
                plan.actions.append(Action(t.name, "mlx", outs, bits, group, out_dtype))
                if bits != default_bits or group != target.group_size:
                    quant_overrides[base] = {"group_size": group, "bits": bits}
                continue
            plan.actions.append(Action(t.name, "copy", [OutTensor(name, keep_dtype, t.shape)], out_dtype=out_dtype))
        elif target.to == "cuda" and target.quant:
            if r == "expert":
                plan.actions.append(expert_action(t, target, out_dtype))
                continue
            if fp8_linears and r in ("attn", "mlp"):
                outs = [OutTensor(t.name, "F8_E4M3", t.shape),
                        OutTensor(t.name + "_scale", "F32", tuple(t.shape[:-1]) + (1,))]
                plan.actions.append(Action(t.name, "fp8", outs, 8, None, out_dtype))
                continue
            plan.actions.append(Action(t.name, "copy", [OutTensor(t.name, keep_dtype, t.shape)], out_dtype=out_dtype))
        else:
            plan.actions.append(Action(t.name, "copy", [OutTensor(t.name, keep_dtype, t.shape)], out_dtype=out_dtype))
    if target.to == "mlx" and (target.bits or target.mixed):
        plan.quantization = {"group_size": target.group_size, "bits": default_bits, "mode": "affine",
                             **quant_overrides}
    if target.to == "cuda" and target.quant:
        plan.quantization_config = cuda_quantization_config(target)
    return plan


def expert_linears(name: str, shape) -> list[tuple[str, int]]:
    """The per-expert linears one packed expert tensor ([E, 2I, H] gate_up_proj or [E, H, I] down_proj) splits into,
    in the order of its rows: (module name, rows)."""
    base, which = name.rsplit(".", 1)
    projs = ("gate_proj", "up_proj") if which == "gate_up_proj" else ("down_proj",)
    rows = shape[1] // len(projs)
    return [(f"{base}.{e}.{p}", rows) for e in range(shape[0]) for p in projs]


def expert_action(t: LogicalInfo, target: Target, out_dtype: str) -> Action:
    """A packed expert tensor as compressed-tensors' per-expert linears, FP8 or int4 (see the module docstring)."""
    K = t.shape[-1]
    weights, scales, constants = [], [], {}
    for module, rows in expert_linears(t.name, t.shape):
        if target.quant == "int4":
            weights.append(OutTensor(module + ".weight_packed", "I32", (rows, K // 8)))
            scales.append(OutTensor(module + ".weight_scale", "BF16", (rows, K // target.group_size)))
            constants[module + ".weight_shape"] = (rows, K)
        else:
            weights.append(OutTensor(module + ".weight", "F8_E4M3", (rows, K)))
            scales.append(OutTensor(module + ".weight_scale", "F32", (rows, 1)))
    shapes = [OutTensor(n, "I64", (2,)) for n in constants]
    outs = [o for group in zip(weights, scales, *([shapes] if shapes else [])) for o in group]
    if target.quant == "int4":
        return Action(t.name, "int4", outs, 4, target.group_size, out_dtype, [weights, scales], constants)
    return Action(t.name, "fp8", outs, 8, None, out_dtype, [weights, scales])


INT4_GROUPS = (128, 64, 32)


def resolve_target(target: Target, tensors: list[LogicalInfo]) -> Target:
    """`--quant int4`'s group size: compressed-tensors' pack-quantized format (what vLLM reads) has whole groups
    only, so the group must divide every expert's input width. The one asked for is checked; without one, the largest
    of 128 / 64 / 32 that fits (64 for the released model, whose experts' down_proj reads 704 values). ValueError
    when none does."""
    if target.to != "cuda" or target.quant != "int4":
        return target
    widths = sorted({t.shape[-1] for t in tensors if t.dtype in FLOAT_ST and role(t.name) == "expert"})
    fits = [g for g in INT4_GROUPS if all(k % g == 0 for k in widths)]
    if target.group_size:
        bad = [k for k in widths if k % target.group_size]
        if bad:
            hint = f"choose {' or '.join(map(str, fits))}" if fits else "no group size of 32, 64 or 128 fits"
            raise ValueError(f"--group-size {target.group_size} does not divide the experts' input width {bad[0]} "
                             f"(compressed-tensors and vLLM need whole groups): {hint}")
        return target
    if not fits:
        raise ValueError(f"no int4 group size of 32, 64 or 128 divides the experts' input widths {widths}")
    return replace(target, group_size=fits[0])


# compressed-tensors targets (regular expressions over module names, matched by vLLM after its own renaming, hence
# the leading `.*`): what each format quantizes. The self-conditioning MLP is no target: vLLM runs it as plain
# nn.Linear layers, which take float weights only.
FP8_LINEARS = [r"re:.*self_attn\.[qkvo]_proj$", r"re:.*mlp\.(gate|up|down)_proj$"]
EXPERT_LINEARS = [r"re:.*experts\.\d+\.(gate|up|down)_proj$"]
ALWAYS_FLOAT = ["lm_head", r"re:.*embed_tokens$", r"re:.*router.*", r"re:.*self_conditioning.*",
                r"re:.*vision_tower.*", r"re:.*embed_vision.*"]
FLOAT_LINEARS = [r"re:.*self_attn.*", r"re:.*mlp\.(gate|up|down)_proj$"]  # ignored when only the experts are int4


def cuda_quantization_config(target: Target) -> dict:
    """config.json's quantization_config: compressed-tensors' schema (validated by its QuantizationConfig in the
    tests); vLLM picks its kernels from it."""
    fp8 = {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False}
    fp8_act = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}
    int4 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": target.group_size, "symmetric": True,
            "dynamic": False}
    groups: dict = {}
    if target.quant == "fp8":
        groups["group_0"] = {"targets": FP8_LINEARS + EXPERT_LINEARS, "weights": fp8, "input_activations": fp8_act,
                             "format": "float-quantized"}
    else:
        if target.rest == "fp8":
            groups["group_0"] = {"targets": FP8_LINEARS, "weights": fp8, "input_activations": fp8_act,
                                 "format": "float-quantized"}
        groups["group_1"] = {"targets": EXPERT_LINEARS, "weights": int4, "input_activations": None,
                             "format": "pack-quantized"}
    fmt = {("fp8", None): "float-quantized", ("int4", None): "pack-quantized"}.get((target.quant, target.rest),
                                                                                 "mixed-precision")
    ignore = ALWAYS_FLOAT + ([] if target.quant == "fp8" or target.rest == "fp8" else FLOAT_LINEARS)
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None}


# -- logical tensors from config.json alone (dry run) ------------------------------------------------------------------
def text_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Every text tensor of the Hugging Face layout with its shape, from a dgemma ModelConfig."""
    return text_tensor_shapes(cfg)


optional_text_tensor = is_optional


def vision_shapes(raw: dict) -> dict[str, tuple[int, ...]]:
    """The gemma4_vision tower's tensors as the checkpoint names them, from config.json alone (dry runs; the converter
    copies the vision tensors the checkpoint holds, unquantized). One definition with the vision loaders'."""
    from dgemma.config import VisionConfig
    from dgemma.vision import vision_tensor_shapes

    vision = VisionConfig.from_dict(raw)
    return {} if vision is None else vision_tensor_shapes(vision)


def logical_from_config(cfg, dtype: str) -> list[LogicalInfo]:
    shapes = dict(text_shapes(cfg))
    shapes.update(vision_shapes(cfg.raw))
    return [LogicalInfo(n, s, dtype) for n, s in shapes.items()]


# -- memory model -------------------------------------------------------------------------------------------------------
CHUNK_BYTES = 4 << 20           # float32 working chunk per step (rows of one tensor's [-1, last dim] view): small
                                # enough that the quantizer's passes over it stay in the CPU caches
MAX_WORKERS = 8                 # chunks converted at once (one per CPU, at most this many)
IN_FLIGHT = 2 * MAX_WORKERS     # chunks read ahead / waiting to be written, at most
BASE_RSS = 600 << 20            # python + torch + safetensors, measured on CPU
WORK_FACTOR = 4                 # float32 copies alive while one chunk is quantized
MMAP_RESIDENT = False           # rows are read with preadv into the chunk itself: nothing else of the source is mapped


def estimate_peak(actions: list[Action], shapes: dict[str, tuple[int, ...]]) -> int:
    """Peak resident memory of the streaming conversion: base + the largest per-chunk working set. Independent of
    the model size by construction: the largest tensor is streamed in chunks of rows, IN_FLIGHT chunks at a time."""
    worst = 0
    for a in actions:
        shape = shapes[a.src]
        n = numel(shape)
        row = shape[-1] if len(shape) > 1 else n
        rows = max(1, min(n // max(1, row), CHUNK_BYTES // max(1, 4 * row)))
        chunk = min(n, rows * row)
        worst = max(worst, chunk * 4 * WORK_FACTOR * IN_FLIGHT + (n * 4 if MMAP_RESIDENT else 0) // 2)
    return BASE_RSS + worst
