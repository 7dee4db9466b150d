"""The MLX backend against transformers' DiffusionGemmaForBlockDiffusion (and the PyTorch backend) on the same random
weights: cache, logits, self-conditioning, commits, full generations, bf16, quantized checkpoints, errors, RNG."""

import json
import shutil

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")
transformers = pytest.importorskip("transformers")

import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import dgemma  # noqa: E402
from dgemma.backend import backend_class  # noqa: E402
from dgemma.errors import CheckpointError, InputError  # noqa: E402
from dgemma.sampler import ScriptedNoise  # noqa: E402
from reference import Oracle, injected_noise, load_reference, make_checkpoint, padded  # noqa: E402

from dgemma.backends.cuda.backend import TorchOps  # noqa: E402
from dgemma.backends.mlx import MLXBackend, quantize_model  # noqa: E402
from dgemma.backends.mlx.backend import MLXOps  # noqa: E402
from dgemma.backends.mlx.model import DiffusionGemmaText, QuantizedSwitchLinear  # noqa: E402
from dgemma.kvlayout import span_bucket  # noqa: E402
from dgemma.passes import CachePasses  # noqa: E402


# -- fixtures: one random checkpoint per kind, written once per module ------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The reference runs ~10x faster single-threaded on a small, shared CPU (no spinning thread pool)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckdir(tmp_path_factory):
    return tmp_path_factory.mktemp("mlx_ckpts")


@pytest.fixture(scope="module")
def tiny(ckdir):
    """6 layers (5 sliding with window 8, 1 full), canvas 16, float32."""
    return make_checkpoint(ckdir / "tiny", canvas_length=16, scale=0.5)


@pytest.fixture(scope="module")
def two_full(ckdir):
    return make_checkpoint(ckdir / "two_full", canvas_length=16, scale=0.5, num_hidden_layers=12, seed=1)


@pytest.fixture(scope="module")
def bf16(ckdir):
    """bf16 with every expert active (top-k = E): MLX and PyTorch round differently (different kernels), and on a
    random model a one-ulp difference in a bf16 router logit often swaps the k-th expert for the (k+1)-th, which then
    spreads to every canvas position through bidirectional attention. Routing choices are covered in float32."""
    return make_checkpoint(ckdir / "bf16", canvas_length=16, scale=0.5, dtype=torch.bfloat16, seed=2, num_experts=4,
                           top_k_experts=4)


@pytest.fixture(scope="module")
def tiny_mlx(tiny):
    return dgemma.load(tiny, backend="mlx")


# -- helpers -------------------------------------------------------------------------------------------------------
def f32(x):
    if isinstance(x, torch.Tensor):
        return x.float().numpy()
    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32))
    return np.asarray(x, dtype=np.float32)


def rel(a, b):
    a, b = f32(a), f32(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def check_cache(oracle, state, tol):
    """Keys and values agree on every real (non-pad) position of every layer; the lengths agree too."""
    for i, layer in enumerate(oracle.cache.layers):
        L = state.keys[i].shape[2]
        assert layer.keys.shape[2] == L, f"layer {i}: cache length {L}, reference {layer.keys.shape[2]}"
        real = np.asarray(state.valid)[:, -L:]
        for name, ours, theirs in (("keys", state.keys[i], layer.keys), ("values", state.values[i], layer.values)):
            ours, theirs = f32(ours), f32(theirs)
            diff = np.abs(ours - theirs).max(axis=(1, 3))  # [B, L]
            assert diff[real].max() <= tol * np.abs(theirs).max(), f"layer {i} {name}"


# -- parity with the reference -------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tiny", "two_full"])
def test_prefill_denoise_commit_parity(which, request):
    """Batch of two, left padded, the longer prompt (20) past the sliding window (8); two canvases (a commit between);
    logits with and without self-conditioning; float32 within 1e-4 of the reference."""
    path = request.getfixturevalue(which)
    model = dgemma.load(path, backend="mlx")
    assert isinstance(model.backend, MLXBackend)
    oracle = Oracle(path)
    g = torch.Generator().manual_seed(0)
    V, C = model.config.vocab_size, model.config.canvas_length
    prompts = [torch.randint(3, V, (20,), generator=g).tolist(), torch.randint(3, V, (13,), generator=g).tolist()]
    ids, mask = padded(prompts)
    state = model.prefill(ids.numpy(), mask.numpy())
    oracle.prefill(ids, mask)
    check_cache(oracle, state, 1e-4)
    for block in range(2):
        canvas = torch.randint(0, V, (2, C), generator=g)
        ref = oracle.denoise(canvas)
        logits = model.denoise(state, canvas.numpy())
        ours = np.asarray(logits)
        assert isinstance(logits.native, mx.array)
        assert ours.dtype == np.float32 and ours.shape == (2, C, V)
        assert rel(ours, ref) < 1e-4, f"denoise, block {block}"
        sc = ref / 0.7  # self-conditioning on processed logits; host logits the first time, device logits next
        sc_ours = sc.numpy() if block == 0 else mx.array(np.asarray(logits)) / 0.7
        assert rel(model.denoise(state, canvas.numpy(), sc_ours), oracle.denoise(canvas, sc)) < 1e-4
        model.commit(state, canvas.numpy())
        oracle.commit(canvas)
        check_cache(oracle, state, 1e-4)


def test_unpadded_prompt_parity(two_full):
    """No padding anywhere: the decoder runs without a mask."""
    model = dgemma.load(two_full, backend="mlx")
    oracle = Oracle(two_full)
    ids = torch.arange(3, 40)[None]
    state = model.prefill(ids.numpy())
    assert not state.has_padding
    oracle.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
    canvas = torch.arange(100, 116)[None]
    assert rel(model.denoise(state, canvas.numpy()), oracle.denoise(canvas)) < 1e-4


def test_bf16_parity(bf16):
    """bf16 agrees with the bf16 reference within bf16 rounding: the early-layer cache within 3e-2, and the logits
    closer to the bf16 reference than the reference's own bf16 logits are to its float32 logits on the same weights
    (this random model amplifies rounding: that float32-vs-bf16 gap is ~0.14 of the logit scale, and even the
    PyTorch backend, built on the very same kernels, sits ~0.05 from the bf16 reference). Float32 on the bf16
    weights must match the float32 reference to 1e-4, so the wiring itself is checked exactly."""
    model = dgemma.load(bf16, backend="mlx")
    assert model.backend.dtype == mx.bfloat16
    m32 = dgemma.load(bf16, backend="mlx", dtype="float32")
    oracle, o32 = Oracle(bf16, dtype=torch.bfloat16), Oracle(bf16, dtype=torch.float32)
    ids, mask = padded([list(range(5, 25)), list(range(30, 41))])
    state, s32 = model.prefill(ids.numpy(), mask.numpy()), m32.prefill(ids.numpy(), mask.numpy())
    oracle.prefill(ids, mask)
    o32.prefill(ids, mask)
    check_cache(oracle, state, 6e-2)
    canvas = torch.arange(50, 82).reshape(2, 16)
    for step in range(2):
        ref, ref32 = oracle.denoise(canvas), o32.denoise(canvas)
        ours, ours32 = model.denoise(state, canvas.numpy()), m32.denoise(s32, canvas.numpy())
        assert np.asarray(ours).dtype == np.float32
        assert rel(ours32, ref32) < 1e-4
        err, noise = rel(ours, ref), rel(ref, ref32)
        print(f"\nbf16 logits: rel err vs bf16 reference {err:.4f}; reference bf16 vs float32 {noise:.4f}")
        assert err < noise
        if step == 0:
            sc = ref / 0.7
            ref_sc = oracle.denoise(canvas, sc)
            err_sc = rel(model.denoise(state, canvas.numpy(), sc.float().numpy()), ref_sc)
            noise_sc = rel(ref_sc, o32.denoise(canvas, sc.float()))
            print(f"bf16 with self-conditioning: rel err {err_sc:.4f}; reference bf16 vs float32 {noise_sc:.4f}")
            assert err_sc < 1.5 * noise_sc  # wrong wiring gives O(1)
            for m, s in ((model, state), (m32, s32)):
                m.commit(s, canvas.numpy())
            oracle.commit(canvas)
            o32.commit(canvas)


@pytest.mark.slow
def test_generation_identical_across_backends_and_reference(tiny, tiny_mlx):
    """Same prompts, same ScriptedNoise: the same tokens from the MLX backend, the PyTorch backend and the reference."""
    prompts = [list(range(5, 25)), list(range(40, 52))]
    seeds = [11, 12]
    kw = dict(max_new_tokens=48, max_denoising_steps=12, eos_token_ids=[1], pad_token_id=0)
    m_mlx = tiny_mlx
    m_pt = dgemma.load(tiny, backend="cuda")
    r_mlx = m_mlx.generate_batch(prompts, noises=[ScriptedNoise(s, m_mlx.backend.ops) for s in seeds], **kw)
    r_pt = m_pt.generate_batch(prompts, noises=[ScriptedNoise(s, m_pt.backend.ops) for s in seeds], **kw)
    ids, mask = padded(prompts)
    with injected_noise(seeds, 384, 16):
        out = load_reference(tiny).generate(ids, attention_mask=mask, max_new_tokens=48, max_denoising_steps=12,
                                            eos_token_id=[1], pad_token_id=0)
    for i in range(2):
        want = out.sequences[i, ids.shape[1]:].tolist()
        assert r_mlx[i].raw_token_ids == want
        assert r_pt[i].raw_token_ids == want
        assert r_mlx[i].stats.tokens_per_forward == pytest.approx(out.tokens_per_forward[i].item(), rel=1e-6)
    assert len(r_mlx[0].raw_token_ids) == 48


# -- the sampler primitives ------------------------------------------------------------------------------------------
def test_ops_match_torch_ops():
    ops, tops = MLXOps(), TorchOps(torch.device("cpu"))
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 16, 384)).astype(np.float32) * 4
    a, t = ops.from_numpy(logits), tops.from_numpy(logits)
    lp, tlp = ops.log_softmax(a), tops.log_softmax(t)
    assert np.allclose(ops.to_numpy(lp), tops.to_numpy(tlp), atol=1e-5)
    probs, tprobs = ops.softmax(lp), tops.softmax(tlp)
    assert np.allclose(ops.to_numpy(probs), tops.to_numpy(tprobs), atol=1e-6)
    u = rng.random((2, 16), dtype=np.float32)
    u[0, 0], u[0, 1] = 0.0, 1.0  # the edges: first index, and the clamp to V-1
    got = ops.to_numpy(ops.sample_categorical(probs, ops.from_numpy(u)))
    want = tops.to_numpy(tops.sample_categorical(tprobs, tops.from_numpy(u)))
    assert (got == want).all() and got.max() <= 383
    assert (ops.to_numpy(ops.argmax(a)) == tops.to_numpy(tops.argmax(t))).all()
    ent = rng.random((2, 16)).astype(np.float32)
    vals, order = ops.sort(ops.from_numpy(ent))
    assert (ops.to_numpy(vals) == np.sort(ent, -1)).all() and (ops.to_numpy(order) == np.argsort(ent, -1)).all()
    sel = ops.to_numpy(ops.cumsum(vals)) <= 1.0
    back = ops.to_numpy(ops.scatter(order, ops.from_numpy(sel)))
    tback = tops.to_numpy(tops.scatter(torch.as_tensor(np.argsort(ent, -1)), torch.as_tensor(sel)))
    assert (back == tback).all()
    assert ops.to_numpy(ops.full((2,), False, like=a)).dtype == np.bool_
    x = ops.from_numpy(np.array([[1, 2], [3, 4]]))
    assert ops.to_numpy(ops.all_equal(x, ops.from_numpy(np.array([[1, 2], [3, 5]])))).tolist() == [True, False]
    assert ops.to_numpy(ops.clamp_min(ops.from_numpy(np.array([-1.0, 2.0])), 0.0)).tolist() == [0.0, 2.0]
    assert ops.to_numpy(ops.stack_rows([x[0], x[1]])).tolist() == [[1, 2], [3, 4]]


def test_row_noise_is_per_row_and_batch_independent(tiny_mlx):
    be = tiny_mlx.backend
    a, b = be.row_noise(5), be.row_noise(5)
    first = [np.array(a.tokens(0, 0, 16, 384)), np.array(a.uniforms(0, 1, 16))]
    assert (np.array(b.tokens(0, 0, 16, 384)) == first[0]).all()
    assert (np.array(b.uniforms(0, 1, 16)) == first[1]).all()
    assert not (np.array(a.tokens(0, 1, 16, 384)) == first[0]).all()  # stateful: the next draw differs
    assert not (np.array(be.row_noise(6).tokens(0, 0, 16, 384)) == first[0]).all()
    kw = dict(max_new_tokens=32, max_denoising_steps=6, eos_token_ids=[1])
    alone = tiny_mlx.generate(list(range(40, 52)), seed=7, **kw)
    batch = tiny_mlx.generate_batch([list(range(5, 25)), list(range(40, 52))], seeds=[9, 7], **kw)
    assert batch[1].raw_token_ids == alone.raw_token_ids
    assert tiny_mlx.generate(list(range(40, 52)), seed=8, **kw).raw_token_ids != alone.raw_token_ids


def test_one_eval_per_step(tiny_mlx, monkeypatch):
    """The backend never evaluates on its own during denoising: the scheduler's one host read per step is all."""
    calls = {"eval": 0, "item": 0}
    real_eval = mx.eval
    monkeypatch.setattr(mx, "eval", lambda *a, **k: (calls.__setitem__("eval", calls["eval"] + 1), real_eval(*a, **k))[1])
    state = tiny_mlx.prefill(np.arange(5, 25))
    canvas = mx.array(np.arange(16)[None])
    out = tiny_mlx.backend.denoise(state, canvas)
    out2 = tiny_mlx.backend.denoise(state, canvas, self_conditioning_probs=mx.softmax(out, axis=-1))
    assert calls["eval"] == 0
    tiny_mlx.backend.ops.to_numpy(mx.sum(out2))
    assert calls["eval"] == 1


# -- the compiled decoder pass -----------------------------------------------------------------------------------
def test_span_buckets_are_few_and_tight():
    """Cache lengths map to multiples of 64 up to 1024, then to eight read sizes per octave: a read is less than 64
    or an eighth longer than the cache, and 8192 lengths need 40 sizes."""
    sizes = [span_bucket(n) for n in range(1, 8193)]
    assert all(n <= b < n + max(64, n / 8) for n, b in enumerate(sizes, 1))
    assert len(set(sizes)) == 16 + 8 * 3  # 64, 128, ..., 1024, then eight per octave from 1024 to 8192


def test_decoder_traces_once_per_shape_bucket(tiny):
    """A generation of six canvases (24 decoder passes) traces the decoder twice (a canvas's first pass has no
    self-conditioning) per read bucket its cache crosses, not per canvas or pass; the same generation again traces
    nothing."""
    model = dgemma.load(tiny, backend="mlx")
    prompt, C, canvases = list(range(5, 25)), model.config.canvas_length, 6
    kw = dict(max_new_tokens=canvases * C, max_denoising_steps=4, eos_token_ids=[])
    out = model.generate(prompt, seed=0, **kw)
    assert out.stats.decoder_passes == 4 * canvases
    buckets = {span_bucket(len(prompt) + (c + 1) * C) for c in range(canvases)}
    traces = model.backend.model.decoder_traces
    assert 1 <= traces <= 2 * len(buckets) < canvases
    model.generate(prompt, seed=1, **kw)
    assert model.backend.model.decoder_traces == traces


def test_compiled_fast_pass_matches_the_core_pass(tiny):
    """A fast pass (some canvas positions forwarded, widths padded up to a bucket, self-conditioning on) gives the
    core's uncompiled pass's hidden states and cache writes, on a padded batch; widths 3, 5 and 7 share one trace."""
    model = dgemma.load(tiny, backend="mlx")
    be, m = model.backend, model.backend.model
    ids, mask = padded([list(range(5, 25)), list(range(40, 53))])
    rng = np.random.default_rng(0)
    C, H = model.config.canvas_length, model.config.hidden_size
    canvas = rng.integers(0, model.config.vocab_size, (2, C))
    for width in (3, 5, 7):
        ours, core = (be.prefill(ids.numpy(), mask.numpy()) for _ in range(2))
        for c in (ours, core):  # an exact pass first: every canvas slot holds keys and values
            CachePasses.decode_rows(m, c, slice(0, 2), mx.array(canvas.astype(np.int32)))
        idx = np.sort(np.stack([rng.choice(C, width, replace=False) for _ in range(2)]), axis=1)
        sub = mx.array(np.take_along_axis(canvas, idx, 1).astype(np.int32))
        soft = mx.array(rng.normal(size=(2, width, H)).astype(np.float32))
        got = m.decode_rows(ours, slice(0, 2), sub, soft, idx)
        want = CachePasses.decode_rows(m, core, slice(0, 2), sub, soft, idx)
        assert got.shape == (2, width, H)
        assert rel(got, want) < 1e-6, width
        span = int(core.layout.length.max()) + C
        for a, b in zip(ours.key_buffers + ours.value_buffers, core.key_buffers + core.value_buffers):
            n = min(span, b.shape[2])
            assert rel(a[:2, :, :n], b[:2, :, :n]) < 1e-6
    assert m.decoder_traces == 1  # the three widths share a bucket (the exact passes ran uncompiled)


# -- input errors ---------------------------------------------------------------------------------------------------
def test_out_of_vocabulary_ids_are_rejected(tiny_mlx):
    be = tiny_mlx.backend
    with pytest.raises(InputError, match="vocabulary"):
        be.prefill(np.array([[5, 6, 384]]))
    with pytest.raises(InputError, match="vocabulary"):
        be.prefill(mx.array([[5, -1]]))
    with pytest.raises(InputError, match="integer"):
        be.prefill(np.array([[5.0, 6.0]]))
    state = be.prefill(np.array([[5, 6, 7]]))
    bad = np.arange(16)[None].copy()
    bad[0, 3] = 10_000
    with pytest.raises(InputError, match="vocabulary"):
        be.denoise(state, bad)
    with pytest.raises(InputError, match="vocabulary"):
        be.commit(state, bad)
    # A device array is checked lazily (no extra sync): the gather sees clamped ids, the next host read raises.
    out = be.denoise(state, mx.array(bad))
    with pytest.raises(InputError, match="vocabulary"):
        be.ops.to_numpy(out)
    be.ops.to_numpy(be.denoise(state, mx.array(np.arange(16)[None])))  # the queue was cleared
    with pytest.raises(InputError):
        tiny_mlx.generate([5, 6, 999], seed=1, max_new_tokens=16, max_denoising_steps=2)


def test_registry_finds_mlx():
    assert backend_class("mlx") is MLXBackend


# -- quantized checkpoints ------------------------------------------------------------------------------------------
def _save_mlx_checkpoint(src, dst, model: DiffusionGemmaText, quant: dict, layout: str):
    """Write what mlx-lm's nn.quantize + save_weights produce: packed uint32 `weight`, `scales`, `biases`, and a
    `quantization` block in config.json. layout "ours" uses our module names, "mlx-vlm" mlx-vlm's."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, dst / f.name)
    weights = dict(tree_flatten(model.parameters()))
    if layout == "mlx-vlm":
        def rename(n):
            if n.endswith("encoder_layer_scalar"):
                return "model.encoder.language_model." + n.replace("encoder_layer_scalar", "layer_scalar")
            return "model.decoder." + n
        weights = {rename(n): v for n, v in weights.items()}
        quant = {("model.decoder." + k if isinstance(v, (dict, bool)) else k): v for k, v in quant.items()}
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization"] = quant
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def dequantized_copy(qmodel: DiffusionGemmaText) -> DiffusionGemmaText:
    """A float model holding exactly the values the quantized one represents (mx.dequantize of every module)."""
    mods = dict(qmodel.named_modules())
    flat = dict(tree_flatten(qmodel.parameters()))
    out = {}
    for name, v in flat.items():
        base, leaf = name.rsplit(".", 1)
        if leaf in ("scales", "biases"):
            continue
        m = mods.get(base)
        if leaf == "weight" and m is not None and "scales" in m:
            v = mx.dequantize(m.weight, m.scales, m.get("biases"), group_size=m.group_size, bits=m.bits)
        out[name] = v
    fm = DiffusionGemmaText(qmodel.cfg)
    fm.load_weights(list(out.items()))
    return fm


@pytest.mark.parametrize("bits,mixed,layout", [(8, False, "ours"), (4, True, "mlx-vlm"), (4, False, "ours")])
def test_quantized_round_trip(tiny, tiny_mlx, tmp_path, bits, mixed, layout):
    """Quantize (mlx nn.quantize layout), save, load through dgemma.load: the quantized kernels (gather_qmm for
    experts, quantized matmul for the tied head and self-conditioning) give the logits of the dequantized weights,
    and the error against the float model is measured and bounded."""
    float_be = tiny_mlx.backend
    q = MLXBackend(float_be.checkpoint).model  # a fresh float copy to quantize
    quant = quantize_model(q, bits=bits, group_size=32, mixed=mixed)
    path = _save_mlx_checkpoint(tiny, tmp_path / f"q{bits}", q, quant, layout)
    model = dgemma.load(path, backend="mlx")
    qm = model.backend.model
    layer = qm.layers[0]
    assert isinstance(layer.experts.gate_up_proj, QuantizedSwitchLinear) and layer.experts.gate_up_proj.bits == bits
    assert isinstance(layer.experts.down_proj, QuantizedSwitchLinear) and layer.experts.down_proj.bits == bits
    want_other = 8 if mixed else bits
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear) and layer.self_attn.q_proj.bits == want_other
    assert isinstance(layer.router.proj, nn.QuantizedLinear) and layer.router.proj.bits == want_other
    assert isinstance(qm.embed_tokens, nn.QuantizedEmbedding) and qm.embed_tokens.bits == want_other
    ids, mask = padded([list(range(5, 25)), list(range(40, 52))])
    canvas = np.arange(50, 82).reshape(2, 16)
    sq = model.prefill(ids.numpy(), mask.numpy())
    lq = model.backend.denoise(sq, canvas)
    lq_sc = model.backend.denoise(sq, canvas, lq)
    # 1. The quantized path computes exactly what its weights represent.
    deq = dequantized_copy(qm)
    sd = deq.encode(mx.array(ids.numpy()), mask.numpy(), None)
    ld = deq.decode(mx.array(canvas), sd)
    assert rel(lq, ld) < 1e-4
    assert rel(lq_sc, deq.decode(mx.array(canvas), sd, mx.softmax(ld, axis=-1))) < 1e-4
    # 2. Its distance from the float model: quantization noise, amplified by this random model (its bf16 rounding
    # alone moves the logits by ~0.14 of their scale), so the bound only catches gross errors; the numbers are printed.
    sf = float_be.prefill(ids.numpy(), mask.numpy())
    lf = float_be.denoise(sf, canvas)
    err, err_sc = rel(lq, lf), rel(lq_sc, float_be.denoise(sf, canvas, lf))
    w = dict(tree_flatten(qm.parameters()))
    werr = max(rel(deq.layers[0].experts.gate_up_proj.weight, float_be.model.layers[0].experts.gate_up_proj.weight),
               rel(deq.layers[0].self_attn.q_proj.weight, float_be.model.layers[0].self_attn.q_proj.weight))
    print(f"\nquantized {bits}-bit mixed={mixed} layout={layout}: weight rel err {werr:.4f}, "
          f"logits rel err {err:.4f}, with SC {err_sc:.4f}")
    assert w["layers.0.experts.gate_up_proj.weight"].dtype == mx.uint32
    assert werr < {8: 0.01, 4: 0.15}[bits]
    assert 0 < err < 1.5 and err_sc < 1.5
    # A quantized model still generates (the sampler runs on its logits).
    out = model.generate([5, 6, 7, 8], seed=3, max_new_tokens=16, max_denoising_steps=3, eos_token_ids=[])
    assert len(out.raw_token_ids) == 16


def test_quantized_checkpoint_with_wrong_shapes_is_rejected(tiny, tiny_mlx, tmp_path):
    q = MLXBackend(tiny_mlx.backend.checkpoint).model
    quant = quantize_model(q, bits=4, group_size=32)
    path = _save_mlx_checkpoint(tiny, tmp_path / "bad", q, quant, "ours")
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError):
        dgemma.load(path, backend="mlx")
