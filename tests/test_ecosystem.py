"""Files the ecosystem's own tools accept: each test runs the other library's own loader on dgemma's output (and
dgemma's loader on the other library's output) and compares tensors or logits, so either side's drift shows here.

- MLX: `mlx_vlm.convert` (mlx-vlm's converter) and `dgemma convert --to mlx --mixed` write the same bits;
- compressed-tensors (vLLM's reader of quantized checkpoints): its model-free dequantizer on dgemma's FP8 / int4
  output gives dgemma's dequantized weights; a checkpoint compressed with compressed-tensors itself loads in dgemma's
  PyTorch backend with the logits of its dequantized weights;
- PEFT: an adapter saved by dgemma's recipe loads with `PeftModel.from_pretrained` onto transformers' reference model
  with dgemma's logits, and an adapter saved by PEFT loads in dgemma on both backends;
- vLLM: the printed `vllm serve` line names the converted checkpoint and only flags vLLM has.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from reference import make_checkpoint


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.numel() == 0 or torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A random checkpoint whose config states both per_layer_config (what transformers writes) and the released
    config's global_head_dim / num_global_key_value_heads (mlx-vlm 0.7.10's converter reads only those)."""
    path = make_checkpoint(tmp_path_factory.mktemp("eco") / "src", scale=0.5)
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"].update(global_head_dim=32, num_global_key_value_heads=1)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


# -- MLX: mlx-vlm's converter ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [64, 32])
def test_mlx_mixed_equals_mlx_vlm_convert(src, tmp_path, group_size):
    pytest.importorskip("mlx.core")
    mlx_vlm_convert = pytest.importorskip("mlx_vlm.convert").convert
    from dgemma.convert import convert

    mlx_vlm_convert(str(src), str(tmp_path / "mlx-vlm"), quantize=True, q_bits=4, q_group_size=group_size)
    convert(src, tmp_path / "dgemma", to="mlx", mixed=True, group_size=group_size, progress=False)
    theirs, ours = load_all(tmp_path / "mlx-vlm"), load_all(tmp_path / "dgemma")
    assert set(ours) == set(theirs)
    differ = [k for k in theirs if not same_bits(theirs[k], ours[k])]
    assert not differ, f"{len(differ)} of {len(theirs)} tensors differ, e.g. {differ[:3]}"
    assert "model.decoder.self_conditioning.gate_proj.scales" in ours  # quantized, at the experts' bits
    q_theirs = json.loads((tmp_path / "mlx-vlm" / "config.json").read_text())["quantization"]
    q_ours = json.loads((tmp_path / "dgemma" / "config.json").read_text())["quantization"]
    modules = {k: v for k, v in q_theirs.items() if isinstance(v, dict)}
    assert modules and {k: v for k, v in q_ours.items() if isinstance(v, dict)} == modules
    assert {k: q_ours[k] for k in ("bits", "group_size")} == {k: q_theirs[k] for k in ("bits", "group_size")}
