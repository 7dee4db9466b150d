"""The `vllm serve` command line for a DiffusionGemma checkpoint (`dgemma serve --print-vllm-command`).

vLLM serves DiffusionGemma natively (`vllm/model_executor/models/diffusion_gemma.py`). Every flag written here is one
of vLLM's own CLI options, taken from:
  - vLLM's recipe for the model, https://recipes.vllm.ai/Google/diffusiongemma-26B-A4B-it: `--max-num-seqs 4`
    (vLLM pre-allocates max_num_seqs x canvas_length x vocab self-conditioning buffers; more runs out of memory with
    the 262k vocabulary), `--generation-config vllm` (the checkpoint's generation_config.json would otherwise cap
    every request's max_tokens) and `--gpu-memory-utilization 0.8`;
  - vLLM's engine arguments (`vllm serve --help`, docs.vllm.ai "Engine Arguments"): `--host`, `--port`,
    `--served-model-name`, `--max-model-len`, `--quantization compressed-tensors` and `--diffusion-config` (a JSON
    object; `canvas_length` is the field the vLLM deployments of this model set, e.g.
    `--diffusion-config '{"canvas_length": 256}'`).
vLLM itself is not installed here, so the command is checked against those sources, not run.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError

RECIPE_MAX_NUM_SEQS = 4
RECIPE_GPU_MEMORY_UTILIZATION = 0.8


@dataclass
class VllmPlan:
    argv: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def line(self) -> str:
        return shlex.join(self.argv)


def vllm_command(model_ref: str, *, served_model_name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                 max_model_len: int | None = None, max_num_seqs: int | None = None, canvas_length: int | None = None,
                 quantization: str | None = None) -> list[str]:
    """argv of `vllm serve MODEL ...` (every option a flag/value pair)."""
    cmd = ["vllm", "serve", str(model_ref)]
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    cmd += ["--host", host, "--port", str(int(port))]
    if quantization:
        cmd += ["--quantization", quantization]
    if max_model_len:
        cmd += ["--max-model-len", str(int(max_model_len))]
    if canvas_length:
        cmd += ["--diffusion-config", json.dumps({"canvas_length": int(canvas_length)})]
    cmd += ["--max-num-seqs", str(int(max_num_seqs or RECIPE_MAX_NUM_SEQS)), "--generation-config", "vllm",
            "--gpu-memory-utilization", str(RECIPE_GPU_MEMORY_UTILIZATION)]
    return cmd


def _local_config(path: Path) -> dict | None:
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None


def _quantization(cfg: dict, where: Path) -> str | None:
    """The `--quantization` vLLM needs for this checkpoint, or a CheckpointError for a format vLLM cannot read."""
    if cfg.get("quantization"):
        raise CheckpointError(f"{where}: an MLX-quantized checkpoint, which vLLM cannot load; point vLLM at the "
                              "original checkpoint or convert it with `dgemma convert SRC DST --to cuda --quant fp8`")
    qc = cfg.get("quantization_config") or (cfg.get("text_config") or {}).get("quantization_config")
    if not qc:
        return None
    if qc.get("quant_method") != "compressed-tensors":
        return None  # another method (fp8, awq, ...): vLLM picks its loader from quantization_config itself
    if qc.get("dgemma_layout"):
        raise CheckpointError(f"{where}: written by an older dgemma convert whose packed experts vLLM cannot read; "
                              "convert the original again (`dgemma convert SRC DST --to cuda --quant fp8`)")
    return "compressed-tensors"


def plan_vllm_command(model_ref, *, served_model_name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                      max_model_len: int | None = None, max_num_seqs: int | None = None) -> VllmPlan:
    """The command for a local folder (named by its absolute path; context length, canvas and quantization from its
    config.json) or a hub id (passed through)."""
    local = Path(str(model_ref)).expanduser()
    cfg = _local_config(local) if local.is_dir() else None
    if local.exists() and cfg is None:
        raise CheckpointError(f"{local}: no config.json (is this a model folder?)")
    notes = []
    quant = canvas = None
    ref = str(model_ref)
    if cfg is not None:
        ref = str(local.resolve())
        quant = _quantization(cfg, local)
        text = cfg.get("text_config") or {}
        max_model_len = max_model_len or text.get("max_position_embeddings") or cfg.get("max_position_embeddings")
        canvas = cfg.get("canvas_length")
        if quant == "compressed-tensors":
            fmt = (cfg.get("quantization_config") or {}).get("format")
            notes.append(f"{local.name}: a compressed-tensors checkpoint ({fmt}), read by vLLM's compressed-tensors "
                         "loader")
    notes.append("flags from vLLM's DiffusionGemma recipe; dgemma's sampler knobs (entropy bound, steps) are not "
                 "mapped onto vLLM flags")
    argv = vllm_command(ref, served_model_name=served_model_name, host=host, port=port, max_model_len=max_model_len,
                        max_num_seqs=max_num_seqs, canvas_length=canvas, quantization=quant)
    return VllmPlan(argv, notes)


def print_vllm_command(model_ref=None, **options) -> VllmPlan:
    """What `dgemma serve --print-vllm-command` does: the command on stdout, notes on stderr. `model_ref` None: the
    default model (the one `dgemma serve` would load)."""
    import sys

    if model_ref is None:
        from .assets import default_model_path

        model_ref = default_model_path()
    plan = plan_vllm_command(model_ref, **options)
    print(plan.line)
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    return plan
