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


# -- PEFT: LoRA adapters ---------------------------------------------------------------------------------------------
PROMPT = list(range(3, 30))
LANGUAGE_MODEL_LINEARS = (r"model\.(?:decoder|encoder\.language_model)\.layers\.\d+\.(?:self_attn|mlp)\.\w+_proj"
                          r"|model\.decoder\.self_conditioning\.\w+_proj")  # what a PEFT user would target


def _inputs(vocab: int, canvas: int):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, vocab, (1, canvas))
    sc = rng.normal(0, 2, (1, canvas, vocab)).astype(np.float32)  # exercises the self-conditioning adapters
    return ids, sc


def reference_logits(model, canvas_ids, sc) -> np.ndarray:
    """The reference's denoiser logits without and with self-conditioning, stacked (float32)."""
    from reference import Oracle, padded

    oracle = Oracle.__new__(Oracle)
    oracle.model, oracle.C = model.eval(), model.config.canvas_length
    ids, mask = padded([PROMPT])
    oracle.prefill(ids, mask)
    canvas = torch.as_tensor(canvas_ids)
    plain, conditioned = oracle.denoise(canvas), oracle.denoise(canvas, torch.as_tensor(sc))
    return np.stack([plain.float().numpy(), conditioned.float().numpy()])


def dgemma_logits(model, canvas_ids, sc) -> np.ndarray:
    state = model.prefill([PROMPT])
    return np.stack([np.asarray(model.denoise(state, canvas_ids)),
                     np.asarray(model.denoise(state, canvas_ids, self_conditioning_logits=sc))])


def assert_close(got, want, rtol=1e-4):
    err = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"\nlogits max error {err:.2e} of max |logit|")
    assert err <= rtol, f"max error {err:.2e} of max |logit|"


def _dgemma_with_adapters(src, backend: str):
    """A dgemma model on `backend` with the recipe's LoRA (rank 4) on every target, B randomised (so the adapters
    change the logits), and the recipe module that saves / loads them."""
    import dgemma

    model = dgemma.load(src, backend=backend, dtype="float32")
    if backend == "mlx":
        import mlx.core as mx

        from dgemma.backends.mlx import train as recipe

        recipe.apply_lora(model.backend.model, 4, 8.0, seed=0)
        for i, m in enumerate(recipe.lora_modules(model.backend.model).values()):
            m.lora_B = 0.05 * mx.random.normal(m.lora_B.shape, key=mx.random.key(i))
    else:
        from dgemma.backends.cuda import train as recipe

        recipe.apply_lora(model.backend.model, 4, 8.0, seed=0)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in recipe.lora_modules(model.backend.model).values():
                m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
    return model, recipe


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_dgemma_adapter_loads_in_peft(src, tmp_path, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    peft = pytest.importorskip("peft")
    from reference import load_reference

    model, recipe = _dgemma_with_adapters(src, backend)
    recipe.save_lora(model.backend.model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str) and "vision" not in config["target_modules"]
    canvas, sc = _inputs(model.config.vocab_size, model.config.canvas_length)
    ours = dgemma_logits(model, canvas, sc)
    base = load_reference(src)
    plain = reference_logits(base, canvas, sc)
    tuned = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    adapted = {n for n, _ in tuned.named_modules() if n.endswith(".lora_A")}
    assert adapted and not any("vision" in n for n in adapted)
    assert any(".encoder.language_model." in n for n in adapted) and any(".decoder." in n for n in adapted)
    theirs = reference_logits(tuned.base_model.model, canvas, sc)
    assert np.abs(theirs - plain).max() > 100 * np.abs(theirs - ours).max(), "the adapters changed nothing"
    assert_close(ours, theirs)


def _peft_trained_adapter(src, folder: Path):
    """LoRA rank 4 on the language model's linears, trained 3 Adam steps with PEFT on the reference, each encoder
    layer's adapter tied to its decoder twin (their base weights are one tensor, and dgemma runs one set of layers for
    both passes); saved with PEFT's save_pretrained. Returns the trained PEFT model."""
    import peft

    from reference import load_reference

    base = load_reference(src)
    tuned = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_MODEL_LINEARS))
    modules = dict(tuned.named_modules())
    for name, m in modules.items():
        twin = name.replace(".encoder.language_model.", ".decoder.")
        if twin != name and hasattr(m, "lora_A") and twin in modules:
            m.lora_A, m.lora_B = modules[twin].lora_A, modules[twin].lora_B
    torch.manual_seed(0)
    canvas, sc = _inputs(base.config.get_text_config().vocab_size, base.config.canvas_length)
    opt = torch.optim.Adam([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    target = torch.as_tensor(canvas)
    for _ in range(3):
        logits = tuned.base_model.model(input_ids=torch.tensor([PROMPT]), decoder_input_ids=target).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.roll(1, -1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuned.save_pretrained(str(folder))
    return tuned


@pytest.fixture(scope="module")
def peft_adapter(src, tmp_path_factory):
    """(folder, the reference's logits with it) of one PEFT-trained adapter, shared by both backends' tests."""
    pytest.importorskip("peft")
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    tuned = _peft_trained_adapter(src, folder)
    cfg = tuned.base_model.model.config
    return folder, reference_logits(tuned.base_model.model, *_inputs(cfg.get_text_config().vocab_size,
                                                                      cfg.canvas_length))


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_peft_adapter_loads_in_dgemma(src, peft_adapter, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    import dgemma

    folder, theirs = peft_adapter
    model = dgemma.load(src, backend=backend, dtype="float32")
    recipe = pytest.importorskip(f"dgemma.backends.{backend}.train")
    canvas, sc = _inputs(model.config.vocab_size, model.config.canvas_length)
    plain = dgemma_logits(model, canvas, sc)
    recipe.load_lora(model.backend.model, folder)
    ours = dgemma_logits(model, canvas, sc)
    assert np.abs(ours - plain).max() > 100 * np.abs(theirs - ours).max(), "the adapters changed nothing"
    assert_close(ours, theirs)


@pytest.mark.slow
def test_untied_peft_adapter_is_refused(src, tmp_path):
    """PEFT adapters whose encoder and decoder copies differ cannot run on one set of layers: a clear error."""
    peft = pytest.importorskip("peft")
    import dgemma
    from dgemma.backends.cuda import train as recipe
    from reference import load_reference

    tuned = peft.get_peft_model(load_reference(src),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=LANGUAGE_MODEL_LINEARS,
                                                init_lora_weights=False))  # random A and B everywhere
    tuned.save_pretrained(str(tmp_path / "untied"))
    model = dgemma.load(src, backend="cuda")
    with pytest.raises(ValueError, match="different adapters in the encoder and the decoder"):
        recipe.load_lora(model.backend.model, tmp_path / "untied")
    decoder_only = (r"model\.decoder\.layers\.\d+\.(?:self_attn|mlp)\.\w+_proj"
                    r"|model\.decoder\.self_conditioning\.\w+_proj")
    tuned = peft.get_peft_model(load_reference(src), peft.LoraConfig(r=2, lora_alpha=4, target_modules=decoder_only))
    tuned.save_pretrained(str(tmp_path / "decoder-only"))
    with pytest.raises(ValueError, match="decoder's layers only"):
        recipe.load_lora(dgemma.load(src, backend="cuda").backend.model, tmp_path / "decoder-only")
    tuned = peft.get_peft_model(load_reference(src), peft.LoraConfig(r=2, target_modules=LANGUAGE_MODEL_LINEARS,
                                                                     use_dora=True))
    tuned.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(ValueError, match="use_dora"):
        recipe.load_lora(dgemma.load(src, backend="cuda").backend.model, tmp_path / "dora")


# -- compressed-tensors (vLLM's reader of quantized checkpoints) -----------------------------------------------------
CUDA_FORMATS = {"fp8": dict(quant="fp8"), "int4": dict(quant="int4"), "int4+fp8": dict(quant="int4", rest="fp8")}


def expert_slices(dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Packed experts as the per-expert linears compressed-tensors names (gate = the first half of gate_up's rows)."""
    out = {}
    for name, t in dense.items():
        base, _, which = name.rpartition(".")
        if which == "gate_up_proj" and base.endswith(".experts"):
            half = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}.{e}.gate_proj.weight"], out[f"{base}.{e}.up_proj.weight"] = t[e, :half], t[e, half:]
        elif which == "down_proj" and base.endswith(".experts"):
            out.update({f"{base}.{e}.down_proj.weight": t[e] for e in range(t.shape[0])})
        else:
            out[name] = t
    return out


@pytest.mark.parametrize("fmt", list(CUDA_FORMATS))
def test_compressed_tensors_decompresses_dgemma_output(src, tmp_path, fmt):
    """compressed-tensors recognises the checkpoint from config.json alone (its QuantizationConfig schema and its
    model-free dequantizer, which also fails on any quantization parameter no config group claims) and decompresses
    every tensor to dgemma's dequantized weights: FP8 bit for bit (float32 scales), int4 to bfloat16's rounding of
    them (compressed-tensors multiplies in the scale's dtype, bfloat16; dgemma in float32)."""
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    from dgemma.backends.cuda.quantized import iter_dense_tensors
    from dgemma.checkpoint import Checkpoint
    from dgemma.convert import convert

    dst = tmp_path / fmt
    convert(src, dst, to="cuda", progress=False, **CUDA_FORMATS[fmt])
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    config = ct.QuantizationConfig.model_validate(qc)
    assert config.quant_method == "compressed-tensors" and config.quantization_status == "compressed"
    stored = load_all(dst)
    theirs = CompressedTensorsDequantizer(dst, dtype=torch.float32).validate(dict(stored))
    ours = expert_slices(dict(iter_dense_tensors(Checkpoint(dst), dtype=torch.float32)))
    assert set(theirs) == set(ours)
    quantized = [k for k in ours if k + "_scale" in stored or k + "_packed" in stored]
    assert quantized and not any("self_conditioning" in k or "router" in k or "embed" in k for k in quantized)
    assert fmt != "int4" or all(".experts." in k for k in quantized)
    for k in ours:
        want = ours[k]
        if k + "_packed" in stored:  # int4
            want = want.to(torch.bfloat16).float()
        assert torch.equal(theirs[k].float(), want.float()), k
    int4 = sum(k.endswith(".weight_packed") for k in stored)
    fp8 = sum(stored[k].dtype == torch.float8_e4m3fn for k in stored)
    print(f"\n{fmt}: {len(stored)} stored tensors, {fp8} FP8 and {int4} int4 linears decompressed by "
          f"compressed-tensors {ct.__version__} equal dgemma's dequantization")
    assert (fp8 > 0) == (fmt != "int4") and (int4 > 0) == fmt.startswith("int4")


def gather_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of expert_slices: per-expert linears back into transformers' packed [E, 2I, H] / [E, H, I]."""
    import re

    out, slices = {}, {}
    for name, t in tensors.items():
        m = re.match(r"^(.+\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", name)
        if m:
            slices.setdefault(m[1], {})[(int(m[2]), m[3])] = t
        else:
            out[name] = t
    for base, parts in slices.items():
        E = 1 + max(e for e, _ in parts)
        out[base + ".gate_up_proj"] = torch.stack([torch.cat([parts[(e, "gate")], parts[(e, "up")]]) for e in range(E)])
        out[base + ".down_proj"] = torch.stack([parts[(e, "down")] for e in range(E)])
    return out


THEIR_TARGETS = [r"re:.*self_attn\.[qkvo]_proj$", r"re:.*mlp\.(gate|up|down)_proj$",
                 r"re:.*experts\.\d+\.(gate|up|down)_proj$"]


def compress_with_compressed_tensors(src: Path, dst: Path, fmt: str) -> None:
    """A checkpoint quantized by compressed-tensors itself, as llm-compressor lays one out for vLLM: its observers'
    min/max -> calculate_qparams -> its compressor's compress() for every attention, dense-MLP and per-expert linear
    (FP8 W8A8 per channel, or W4A16 int4 in groups of 32), its QuantizationConfig in config.json."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from compressed_tensors.utils.match import match_name
    from safetensors.torch import save_file

    if fmt == "fp8":
        weights = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)
        acts = QuantizationArgs(num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True)
        compression = "float-quantized"
    else:
        weights = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=32, symmetric=True)
        acts, compression = None, "pack-quantized"
    scheme = QuantizationScheme(targets=THEIR_TARGETS, weights=weights, input_activations=acts)
    compressor = BaseCompressor.get_value_from_registry(compression)
    out = {}
    for name, w in expert_slices(load_all(src)).items():
        module = name.rpartition(".")[0]
        if not name.endswith(".weight") or not any(match_name(module, t) for t in THEIR_TARGETS):
            out[name] = w
            continue
        view = w.reshape(w.shape[0], -1, 32) if fmt == "int4" else w.unsqueeze(1)
        scale, _ = calculate_qparams(view.amin(-1), view.amax(-1), weights)
        compressed = compressor.compress({"weight": w, "weight_scale": scale}, scheme)
        out.update({f"{module}.{k}": v.contiguous() for k, v in compressed.items()})
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = QuantizationConfig(
        config_groups={"group_0": scheme}, format=compression, quantization_status="compressed",
        ignore=["lm_head", "re:.*vision_tower.*", "re:.*embed_vision.*"]).model_dump()
    (dst / "config.json").write_text(json.dumps(config, indent=2))


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_compressed_tensors_checkpoint_loads_in_dgemma(src, tmp_path, fmt):
    """dgemma's PyTorch backend on a checkpoint compressed by compressed-tensors gives the logits that the reference
    gives on the weights compressed-tensors' own dequantizer recovers from it (float32, 1e-4)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from safetensors.torch import save_file

    import dgemma
    from reference import load_reference

    theirs = tmp_path / f"ct-{fmt}"
    compress_with_compressed_tensors(src, theirs, fmt)
    dense = tmp_path / "dequantized"
    dense.mkdir()
    weights = CompressedTensorsDequantizer(theirs, dtype=torch.float32).validate(load_all(theirs))
    save_file({k: v.contiguous() for k, v in gather_experts(weights).items()}, str(dense / "model.safetensors"),
              metadata={"format": "pt"})
    (dense / "config.json").write_text((src / "config.json").read_text())
    model = dgemma.load(theirs, backend="cuda", dtype="float32")
    assert model.backend.quantized, "nothing stayed quantized"
    canvas, sc = _inputs(model.config.vocab_size, model.config.canvas_length)
    ours = dgemma_logits(model, canvas, sc)
    want = reference_logits(load_reference(dense), canvas, sc)
    plain = reference_logits(load_reference(src), canvas, sc)
    assert np.abs(want - plain).max() > 0  # the weights were quantized
    assert_close(ours, want)


# -- vLLM: the printed command -----------------------------------------------------------------------------------------
# Options of `vllm serve` this command may use, each from vLLM's own sources (cited in dgemma/vllm.py): its
# DiffusionGemma recipe (--max-num-seqs, --generation-config, --gpu-memory-utilization) and its engine arguments.
VLLM_SERVE_OPTIONS = {"--served-model-name", "--host", "--port", "--quantization", "--max-model-len",
                      "--diffusion-config", "--max-num-seqs", "--generation-config", "--gpu-memory-utilization"}


def _vllm_line(*args) -> tuple[int, list[str], str]:
    from click.testing import CliRunner

    from dgemma.cli import main

    res = CliRunner().invoke(main, ["serve", *args, "--print-vllm-command"])
    lines = [x for x in res.output.splitlines() if x.startswith("vllm ")]
    return res.exit_code, (shlex.split(lines[0]) if lines else []), res.output


def test_print_vllm_command_names_the_converted_checkpoint(src, tmp_path):
    from dgemma.convert import convert

    dst = tmp_path / "dg-fp8"
    convert(src, dst, to="cuda", quant="fp8", progress=False)
    code, argv, out = _vllm_line("--model", str(dst), "--port", "8001")
    assert code == 0, out
    assert argv[:3] == ["vllm", "serve", str(dst.resolve())]
    opts = dict(zip(argv[3::2], argv[4::2]))
    assert set(opts) <= VLLM_SERVE_OPTIONS and len(argv[3:]) == 2 * len(opts), argv
    assert opts["--quantization"] == "compressed-tensors" and opts["--port"] == "8001"
    assert json.loads(opts["--diffusion-config"]) == {"canvas_length": 16}
    assert opts["--max-num-seqs"] == "4" and opts["--generation-config"] == "vllm"
    code, argv, out = _vllm_line("--model", str(src))
    assert code == 0 and argv[2] == str(src.resolve()) and "--quantization" not in argv
    code, argv, out = _vllm_line("--model", "google/diffusiongemma-26B-A4B-it", "--max-batch", "2")
    assert code == 0 and argv[2] == "google/diffusiongemma-26B-A4B-it" and "2" in argv


def test_print_vllm_command_refuses_what_vllm_cannot_load(src, tmp_path):
    from dgemma.convert import convert

    dst = tmp_path / "dg-mlx"
    convert(src, dst, to="mlx", bits=4, progress=False)
    code, argv, out = _vllm_line("--model", str(dst))
    assert code == 2 and not argv and out.strip().splitlines()[-1].startswith("error: ") and "MLX" in out


def test_missing_expert_slice_is_one_clear_error(src, tmp_path):
    from safetensors.torch import save_file

    import dgemma
    from dgemma.convert import convert
    from dgemma.errors import CheckpointError

    dst = tmp_path / "fp8"
    convert(src, dst, to="cuda", quant="fp8", progress=False)
    tensors = {k: v for k, v in load_all(dst).items() if ".layers.0.experts.1.up_proj." not in k}
    for f in list(dst.glob("*.safetensors")) + [dst / "model.safetensors.index.json"]:
        f.unlink()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="expert 1 has no up_proj"):
        dgemma.load(dst, backend="cuda")
    with pytest.raises(CheckpointError, match="expert 1 has no up_proj"):
        convert(dst, tmp_path / "back", to="hf", progress=False)
