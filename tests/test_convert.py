"""dgemma convert: round trips through every format, MLX packing == mx.quantize, dry-run numbers, bad input."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import dgemma
from dgemma.checkpoint import Checkpoint
from dgemma.convert import convert
from dgemma.errors import CheckpointError, DgemmaError, InputError

from reference import make_checkpoint

FORMATS = {  # name -> (convert kwargs, max weight error relative to each tensor's absmax)
    "hf-copy": (dict(to="hf"), 0.0),
    "mlx-float": (dict(to="mlx"), 0.0),
    "mlx-8bit": (dict(to="mlx", bits=8), 0.01),
    "mlx-4bit": (dict(to="mlx", bits=4), 0.15),
    "mlx-4bit-g32": (dict(to="mlx", bits=4, group_size=32), 0.15),
    "mlx-mixed": (dict(to="mlx", mixed=True), 0.15),
    "cuda-fp8": (dict(to="cuda", quant="fp8"), 0.05),
    "cuda-int4": (dict(to="cuda", quant="int4"), 0.1),  # group: the largest that divides K (32 here)
    "cuda-int4-fp8": (dict(to="cuda", quant="int4", group_size=32, rest="fp8"), 0.1),
}
LOGIT_TOL = ["cuda-fp8", "cuda-int4", "mlx-4bit"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    make_checkpoint(root / "src", scale=0.5)
    return root


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def folder_digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


@pytest.fixture(scope="module")
def roundtrips(work):
    """hf -> X -> hf for every format, once."""
    src = work / "src"
    before = folder_digest(src)
    out = {}
    for name, (kw, _) in FORMATS.items():
        mid, back = work / f"{name}", work / f"{name}-back"
        convert(src, mid, progress=False, **kw)
        convert(mid, back, to="hf", progress=False)
        out[name] = (mid, back)
    assert folder_digest(src) == before, "the source folder was modified"
    return out


@pytest.mark.parametrize("name", list(FORMATS))
def test_round_trip_weights(work, roundtrips, name):
    ref = load_all(work / "src")
    got = load_all(roundtrips[name][1])
    assert set(got) == set(ref)
    bound = FORMATS[name][1]
    worst = 0.0
    for k, r in ref.items():
        g = got[k]
        assert g.shape == r.shape and g.dtype == r.dtype, k
        err = ((g.float() - r.float()).abs().max() / r.float().abs().max().clamp(min=1e-12)).item()
        worst = max(worst, err)
        quantizable = k.startswith("model.decoder.") and (k.endswith(("_proj", "proj.weight", "embed_tokens.weight")))
        if not quantizable:
            assert torch.equal(g, r), f"{k} is not quantized and must round-trip exactly"
        assert err <= bound, f"{name}: {k} relative error {err:.4f} > {bound}"
    if bound:
        assert worst > 0, "a quantized format reproduced every weight exactly: nothing was quantized"
    print(f"\n{name}: worst weight error {worst:.4f} of the tensor's absmax")


_LOGITS: dict = {}


def _logits(folder, prompt, canvas):
    key = str(folder)
    if key not in _LOGITS:
        m = dgemma.load(folder, backend="cuda")
        _LOGITS[key] = np.asarray(m.denoise(m.prefill([prompt]), canvas))
    return _LOGITS[key]


@pytest.mark.parametrize("name", LOGIT_TOL)
def test_round_trip_logits(work, roundtrips, name):
    """Logits of the dequantized round trip against the float model. The tiny random model amplifies any weight
    change (bf16 rounding alone moves its logits by ~8%), so the bound is relative to a control: the same model with
    unstructured Gaussian noise of the same per-tensor RMS as this format's quantization error."""
    from safetensors.torch import save_file

    prompt = list(range(3, 40))
    canvas = np.random.default_rng(0).integers(0, 384, (1, 16))
    ref_w = load_all(work / "src")
    got_w = load_all(roundtrips[name][1])
    control = work / f"{name}-control"
    if not control.exists():
        shutil.copytree(work / "src", control, ignore=shutil.ignore_patterns("*.safetensors"))
        g = torch.Generator().manual_seed(0)
        noisy = {}
        for k, r in ref_w.items():
            rms = (got_w[k] - r).pow(2).mean().sqrt()
            noisy[k] = r + rms * torch.randn(r.shape, generator=g)
        save_file(noisy, control / "model.safetensors", metadata={"format": "pt"})
    a = _logits(work / "src", prompt, canvas)
    b = _logits(roundtrips[name][1], prompt, canvas)
    c = _logits(control, prompt, canvas)
    rel = float(np.abs(a - b).max() / np.abs(a).max())
    ctl = float(np.abs(a - c).max() / np.abs(a).max())
    agree = float((a.argmax(-1) == b.argmax(-1)).mean())
    print(f"\n{name}: logits max error {rel:.4f} of max |logit| (same-RMS noise control {ctl:.4f}), "
          f"argmax agreement {agree:.3f}")
    assert 0 < rel <= 4 * ctl + 0.05


def test_mlx_packing_equals_mx_quantize(work, roundtrips):
    mx = pytest.importorskip("mlx.core")
    from dgemma.convert.quant import mlx_quantize

    g = torch.Generator().manual_seed(1)
    for dt, mdt in ((torch.float32, mx.float32), (torch.bfloat16, mx.bfloat16)):
        for bits in (4, 8):
            for gs in (32, 64, 128):
                w = (torch.randn(3, 24, 256, generator=g) * 0.05).to(dt)
                w[0, 0, :gs] = 0.0       # a constant group
                w[0, 1, :gs] = 0.25      # another
                w[1, 0, :gs] = torch.linspace(-1, 0.1, gs)
                p, s, b = mlx_quantize(w, bits, gs, dt)
                mp, ms, mb = mx.quantize(mx.array(w.float().numpy()).astype(mdt), group_size=gs, bits=bits)
                assert np.array_equal(np.array(mp).view(np.int32), p.numpy())
                assert np.array_equal(np.array(ms.astype(mx.float32)), s.float().numpy())
                assert np.array_equal(np.array(mb.astype(mx.float32)), b.float().numpy())
    # and what the converter wrote for a real expert tensor and a linear
    src = load_all(work / "src")
    out = load_all(roundtrips["mlx-4bit-g32"][0])  # the tiny experts' down_proj has K = 32
    for name, base in (("model.decoder.layers.0.experts.gate_up_proj", "model.decoder.layers.0.experts.gate_up_proj"),
                       ("model.decoder.layers.5.experts.down_proj", "model.decoder.layers.5.experts.down_proj"),
                       ("model.decoder.layers.1.self_attn.q_proj.weight", "model.decoder.layers.1.self_attn.q_proj")):
        mp, ms, mb = mx.quantize(mx.array(src[name].numpy()), group_size=32, bits=4)
        assert np.array_equal(np.array(mp), out[base + ".weight"].numpy()), name
        assert np.array_equal(np.array(ms), out[base + ".scales"].numpy()), name
        assert np.array_equal(np.array(mb), out[base + ".biases"].numpy()), name


def test_mlx_output_layout_and_mlx_vlm_load(work, roundtrips):
    mid = roundtrips["mlx-mixed"][0]
    cfg = json.loads((mid / "config.json").read_text())
    q = cfg["quantization"]
    assert q["bits"] == 4 and q["group_size"] == 64 and q["mode"] == "affine" and cfg["quantization_config"] == q
    assert q["model.decoder.layers.0.self_attn.q_proj"] == {"group_size": 64, "bits": 8}
    assert q["model.decoder.embed_tokens"]["bits"] == 8 and "model.decoder.layers.0.experts.gate_up_proj" not in q
    names = set(load_all(mid))
    assert "model.decoder.layers.0.experts.gate_up_proj.weight" in names
    assert "model.decoder.layers.0.experts.gate_up_proj.biases" in names
    assert "model.decoder.layers.0.input_layernorm.scales" not in names
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_vlm")
    from mlx_vlm.utils import load_model

    # mlx-vlm 0.7.10 reads the full-attention geometry from global_head_dim / num_global_key_value_heads (the released
    # config has them; the tiny test config only has per_layer_config), so add them to a copy.
    copy = work / "mlx-vlm-copy"
    shutil.copytree(mid, copy)
    cfg["text_config"].update(global_head_dim=32, num_global_key_value_heads=1)
    (copy / "config.json").write_text(json.dumps(cfg))
    m = load_model(copy)
    layer = m.model.decoder.layers[0]
    assert layer.experts.gate_up_proj.bits == 4 and layer.self_attn.q_proj.bits == 8
    assert m.model.decoder.embed_tokens.bits == 8
    back = load_all(roundtrips["mlx-mixed"][1])
    gu = layer.experts.gate_up_proj
    deq = mx.dequantize(gu.weight, gu.scales, gu.biases, group_size=64, bits=4)
    assert np.allclose(np.array(deq), back["model.decoder.layers.0.experts.gate_up_proj"].numpy(), atol=1e-6)


def test_cuda_quantized_loader(work, roundtrips):
    """backends/cuda/quantized.py: dequantize-on-load equals the converter's hf output, and the in-memory quantized
    modules give the logits of the dequantized model."""
    from dgemma.backends.cuda.model import sanitize_name as sanitize
    from dgemma.backends.cuda.quantized import (FP8Linear, Int4Experts, install_quantized_modules, iter_dense_tensors,
                                                quantization_kind)

    prompt = torch.arange(3, 30).tolist()
    for name, kind in (("cuda-fp8", "fp8"), ("cuda-int4-fp8", "int4")):
        mid, back = roundtrips[name]
        ckpt = Checkpoint(mid)
        assert quantization_kind(ckpt) == kind
        qc = ckpt.raw_config["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors"
        want = load_all(back)
        dense = dict(iter_dense_tensors(ckpt, dtype=torch.float32))
        assert set(dense) == set(want)
        for k in want:
            assert torch.equal(dense[k], want[k]), k
        model = dgemma.load(back, backend="cuda")
        canvas = np.random.default_rng(1).integers(0, model.config.vocab_size, (1, model.config.canvas_length))
        a = np.asarray(model.denoise(model.prefill([prompt]), canvas))
        loaded = install_quantized_modules(model.backend.model, ckpt, sanitize, torch.device("cpu"), torch.float32)
        assert "layers.0.experts.gate_up_proj" in loaded and "layers.0.self_attn.q_proj.weight" in loaded
        assert isinstance(model.backend.model.layers[0].self_attn.q_proj, FP8Linear)
        if kind == "int4":
            assert isinstance(model.backend.model.layers[0].experts, Int4Experts)
        b = np.asarray(model.denoise(model.prefill([prompt]), canvas))
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
        # The backend loads the quantized folder itself, keeping the weights quantized, with the same logits.
        direct = dgemma.load(mid, backend="cuda", dtype="float32")
        assert isinstance(direct.backend.model.layers[0].self_attn.q_proj, FP8Linear)
        assert "layers.0.experts.gate_up_proj" in direct.backend.quantized
        c = np.asarray(direct.denoise(direct.prefill([prompt]), canvas))
        np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-4)
        assert direct.generate(prompt, seed=0, max_new_tokens=8, max_denoising_steps=2).stats.generated_tokens > 0


def real_config() -> dict:
    n = 30
    return {
        "model_type": "diffusion_gemma", "architectures": ["DiffusionGemmaForBlockDiffusion"], "canvas_length": 256,
        "dtype": "bfloat16", "eos_token_id": [1, 106, 50],
        "text_config": {
            "model_type": "diffusion_gemma_text", "hidden_size": 2816, "num_hidden_layers": n,
            "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "global_head_dim": 512,
            "num_global_key_value_heads": 2, "num_experts": 128, "top_k_experts": 8, "moe_intermediate_size": 704,
            "intermediate_size": 2112, "vocab_size": 262144, "max_position_embeddings": 262144,
            "sliding_window": 1024,
            "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)],
        },
        # ~0.5B parameters of vision tower (gemma4_vision geometry)
        "vision_config": {"model_type": "gemma4_vision", "hidden_size": 1152, "intermediate_size": 4304,
                          "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
                          "head_dim": 72, "patch_size": 16,
                          "position_embedding_size": 10240},
    }


def test_dry_run_real_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(real_config()))
    rep = convert(tmp_path, to="mlx", bits=4, dry_run=True, progress=False)
    text = rep.format_report()
    assert 24.9e9 < rep.text_params < 25.5e9, rep.text_params
    assert 0.4e9 < rep.vision_params < 0.6e9, rep.vision_params
    assert 25.0e9 < rep.params < 26.0e9
    rows = {(c["to"], c["bits"], c["mixed"], c["quant"], c["rest"]): c for c in rep.choices}
    bf16 = rows[("hf", None, False, None, None)]["bytes"]
    assert 2 * rep.params * 0.999 < bf16 <= 2 * rep.params
    for key in (("mlx", 4, False, None, None), ("mlx", 4, True, None, None), ("cuda", None, False, "int4", None),
                ("cuda", None, False, "int4", "fp8")):
        assert rows[key]["bytes"] < 18e9, (key, rows[key]["bytes"])
    assert 25e9 < rows[("cuda", None, False, "fp8", None)]["bytes"] < 30e9
    largest = 262144 * 2816 * 2  # the bf16 embedding
    assert all(c["peak_bytes"] < 1.5 * largest + 1e9 for c in rep.choices)  # the streaming goal
    assert sum(c["requested"] for c in rep.choices) == 1 and rows[("mlx", 4, False, None, None)]["requested"]
    assert "GB" in text and not list(tmp_path.glob("*.safetensors"))
    import subprocess
    import sys

    code = ("import sys; from dgemma.convert import convert; "
            f"convert({str(tmp_path)!r}, to='cuda', quant='int4', dry_run=True, progress=False); "
            "assert 'torch' not in sys.modules and 'mlx' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)  # a dry run imports neither framework
    print("\n" + text)


# -- streaming, sharding, carried files ----------------------------------------------------------------------------------
def test_shards_and_carried_files(work):
    src = work / "src-with-tokenizer"
    if not src.exists():
        shutil.copytree(work / "src", src)
        (src / "tokenizer_config.json").write_text("{}")
        (src / "chat_template.jinja").write_text("{{ messages }}")
    out = work / "sharded"
    rep = convert(src, out, to="mlx", bits=8, progress=False, shard_size_gb=0.0005)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert rep.shards == len(files) > 2
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}" and (out / "tokenizer_config.json").exists()
    assert (out / "generation_config.json").exists()
    ck = Checkpoint(out)  # the index names every tensor in a shard that holds it
    assert set(ck.tensors) == set(load_all(out))
    assert not list(work.glob(".sharded.partial-*"))


# -- bad input: one clear error, no partial DST ---------------------------------------------------------------------------
def no_partial(dst: Path):
    assert not dst.exists()
    assert not list(dst.parent.glob(f".{dst.name}.partial-*"))


def test_bad_bits_and_flags(work):
    dst = work / "bad-flags"
    for kw, msg in ((dict(to="mlx", bits=3), "--bits"), (dict(to="cuda", bits=4), "--bits"),
                    (dict(to="mlx", bits=4, group_size=48), "--group-size"), (dict(to="cuda", quant="int2"), "--quant"),
                    (dict(to="gguf"), "--to"), (dict(to="mlx", mixed=True, bits=8), "--mixed"),
                    (dict(to="hf", dtype="int8"), "--dtype")):
        with pytest.raises(InputError, match=msg):
            convert(work / "src", dst, progress=False, **kw)
    no_partial(dst)


def test_dst_inside_src_and_existing_dst(work):
    with pytest.raises(InputError, match="inside the source"):
        convert(work / "src", work / "src" / "out", to="hf", progress=False)
    assert not (work / "src" / "out").exists()
    existing = work / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="already exists"):
        convert(work / "src", existing, to="hf", progress=False)
    assert (existing / "keep.txt").read_text() == "x"
    convert(work / "src", existing, to="hf", progress=False, force=True)
    assert not (existing / "keep.txt").exists() and Checkpoint(existing).tensors


def test_missing_shard(work, roundtrips):
    broken = work / "missing-shard"
    shutil.copytree(work / "sharded" if (work / "sharded").exists() else roundtrips["mlx-8bit"][0], broken)
    shards = sorted(broken.glob("*.safetensors"))
    if len(shards) == 1:  # make an index that names a second shard
        idx = json.loads((broken / "model.safetensors.index.json").read_text())
        k = next(iter(idx["weight_map"]))
        idx["weight_map"][k] = "model-00002-of-00002.safetensors"
        (broken / "model.safetensors.index.json").write_text(json.dumps(idx))
    else:
        shards[-1].unlink()
    dst = work / "from-missing"
    with pytest.raises(CheckpointError, match="missing"):
        convert(broken, dst, to="hf", progress=False)
    no_partial(dst)


def test_shape_mismatch(work):
    bad = work / "bad-shape"
    shutil.copytree(work / "src", bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["moe_intermediate_size"] = 48
    (bad / "config.json").write_text(json.dumps(cfg))
    dst = work / "from-bad-shape"
    with pytest.raises(CheckpointError, match=r"experts\.\w+ has shape .* config.json implies"):
        convert(bad, dst, to="mlx", bits=4, progress=False)
    no_partial(dst)


def test_disk_full(work, monkeypatch):
    from dgemma.convert import writer

    calls = {"n": 0}
    real = writer.write_at

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(writer, "write_at", full)
    dst = work / "disk-full"
    with pytest.raises(CheckpointError, match="disk full") as e:
        convert(work / "src", dst, to="cuda", quant="fp8", progress=False)
    assert isinstance(e.value, DgemmaError) and "\n" not in str(e.value)
    assert calls["n"] > 20
    no_partial(dst)


def test_not_enough_space_up_front(work, monkeypatch):
    import importlib
    import shutil as sh

    mod = importlib.import_module("dgemma.convert.convert")

    monkeypatch.setattr(mod.shutil, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    dst = work / "no-space"
    with pytest.raises(CheckpointError, match="not enough disk space"):
        convert(work / "src", dst, to="hf", progress=False)
    no_partial(dst)


def test_earlier_dgemma_cuda_layout_still_loads(work, tmp_path):
    """Folders from dgemma versions before the compressed-tensors layout (3-D FP8 experts + `_scale`, int4 `X_packed` /
    `X_scale` / `X_shape` with a short last group) load in the PyTorch backend with their dequantized weights'
    logits, and convert back to hf."""
    from safetensors.torch import save_file

    from dgemma.backends.cuda.quantized import dequantize_fp8, dequantize_int4
    from dgemma.convert.quant import fp8_quantize, int4_quantize

    src = load_all(work / "src")
    prompt = list(range(3, 30))
    for kind in ("fp8", "int4"):
        old, dense = dict(src), dict(src)
        for name, w in src.items():
            if name.startswith("model.decoder.") and name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                del old[name]
                if kind == "fp8":
                    old[name], old[name + "_scale"] = fp8_quantize(w)
                    dense[name] = dequantize_fp8(old[name], old[name + "_scale"], torch.float32)
                else:
                    old[name + "_packed"], old[name + "_scale"] = int4_quantize(w, 128)
                    old[name + "_shape"] = torch.tensor(list(w.shape))
                    dense[name] = dequantize_int4(old[name + "_packed"], old[name + "_scale"], torch.float32,
                                                  group_size=128)
        for folder, tensors in ((tmp_path / kind, old), (tmp_path / f"{kind}-dense", dense)):
            shutil.copytree(work / "src", folder, ignore=shutil.ignore_patterns("*.safetensors"))
            save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((tmp_path / kind / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "compressed-tensors", "dgemma_layout": {"group_size": 128}}
        (tmp_path / kind / "config.json").write_text(json.dumps(cfg))
        canvas = np.random.default_rng(1).integers(0, 384, (1, 16))
        a = dgemma.load(tmp_path / f"{kind}-dense", backend="cuda")
        b = dgemma.load(tmp_path / kind, backend="cuda", dtype="float32")
        assert "layers.0.experts.gate_up_proj" in b.backend.quantized
        np.testing.assert_allclose(np.asarray(b.denoise(b.prefill([prompt]), canvas)),
                                   np.asarray(a.denoise(a.prefill([prompt]), canvas)), rtol=1e-4, atol=1e-4)
        convert(tmp_path / kind, tmp_path / f"{kind}-back", to="hf", progress=False)
        back = load_all(tmp_path / f"{kind}-back")
        assert all(torch.equal(back[k], dense[k]) for k in dense), kind
