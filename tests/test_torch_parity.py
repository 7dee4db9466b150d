"""The PyTorch backend against transformers' DiffusionGemmaForBlockDiffusion on the same random weights."""

import numpy as np
import pytest
import torch

import dgemma
from dgemma.sampler import ScriptedNoise
from reference import Oracle, injected_noise, load_reference, padded

transformers = pytest.importorskip("transformers")


def as_float(x):
    return x.float() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)).float()


def rel(a, b):
    a, b = as_float(a), as_float(b)
    return ((a - b).abs().max() / b.abs().max()).item()


def check_cache(oracle, state, mask):
    """Keys/values agree on every real (non-pad) position of every layer."""
    for i, layer in enumerate(oracle.cache.layers):
        L = state.keys[i].shape[2]
        assert layer.keys.shape[2] == L, f"layer {i}: cache length {L} vs reference {layer.keys.shape[2]}"
        real = torch.as_tensor(np.asarray(state.valid))[:, -L:]
        for name, ours, theirs in (("keys", state.keys[i], layer.keys), ("values", state.values[i], layer.values)):
            diff = (ours - theirs).abs().amax(dim=(1, 3))  # [B, L]
            assert diff[real].max() <= 1e-4 * theirs.abs().max(), f"layer {i} {name}"


@pytest.mark.parametrize("fixture", ["tiny_ckpt", "two_full_ckpt"])
def test_prefill_denoise_commit_parity(fixture, request):
    path = request.getfixturevalue(fixture)
    model = dgemma.load(path, backend="cuda")
    oracle = Oracle(path)
    g = torch.Generator().manual_seed(0)
    V, C = model.config.vocab_size, model.config.canvas_length
    # Batch of two with left padding; the longer prompt (20) exceeds the sliding window (8).
    prompts = [torch.randint(3, V, (20,), generator=g).tolist(), torch.randint(3, V, (13,), generator=g).tolist()]
    ids, mask = padded(prompts)
    state = model.prefill(ids.numpy(), mask.numpy())
    oracle.prefill(ids, mask)
    check_cache(oracle, state, mask)
    for block in range(3):  # three canvases: two commits
        canvas = torch.randint(0, V, (2, C), generator=g)
        ref = oracle.denoise(canvas)
        ours = model.denoise(state, canvas.numpy())
        assert np.asarray(ours).dtype == np.float32 and np.asarray(ours).shape == (2, C, V)
        assert rel(ours, ref) < 1e-4, f"denoise, block {block}"
        sc = ref / 0.7  # self-conditioning on processed logits
        assert rel(model.denoise(state, canvas.numpy(), sc), oracle.denoise(canvas, sc)) < 1e-4
        # Logits handed back as self-conditioning (the public round trip) work too.
        assert rel(model.denoise(state, canvas.numpy(), ours), oracle.denoise(canvas, ref)) < 1e-4
        model.commit(state, canvas.numpy())
        oracle.commit(canvas)
        check_cache(oracle, state, mask)


def test_unpadded_single_prompt_parity(tiny_ckpt):
    model = dgemma.load(tiny_ckpt, backend="cuda")
    oracle = Oracle(tiny_ckpt)
    ids = torch.arange(3, 40)[None]
    state = model.prefill(ids.numpy())
    oracle.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
    canvas = torch.arange(100, 116)[None]
    assert rel(model.denoise(state, canvas.numpy()), oracle.denoise(canvas)) < 1e-4


def test_bf16_parity(bf16_ckpt):
    """bf16 weights: float32 compute matches the reference exactly; bf16 compute is as close to the exact result as
    the reference's own bf16 run is. (A random MoE amplifies bf16 rounding: expert choices flip, so the reference's
    bf16 logits differ from its float32 ones by tens of percent; a fixed tolerance would test the weights, not us.)"""
    ids, mask = padded([list(range(5, 25)), list(range(30, 41))])
    canvas = torch.arange(50, 82).reshape(2, 16)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        oracle = Oracle(bf16_ckpt, dtype=dtype)
        oracle.prefill(ids, mask)
        logits["ref", dtype] = oracle.denoise(canvas).float()
        model = dgemma.load(bf16_ckpt, backend="cuda", dtype=str(dtype).replace("torch.", ""))
        assert model.backend.dtype == dtype
        state = model.prefill(ids.numpy(), mask.numpy())
        logits["ours", dtype] = as_float(model.denoise(state, canvas.numpy()))
    exact = logits["ref", torch.float32]
    assert rel(logits["ours", torch.float32], exact) < 1e-4
    ref_bf16_error = rel(logits["ref", torch.bfloat16], exact)
    assert rel(logits["ours", torch.bfloat16], exact) <= 1.25 * ref_bf16_error + 1e-3
    assert rel(logits["ours", torch.bfloat16], logits["ref", torch.bfloat16]) <= 1.25 * ref_bf16_error + 1e-3


@pytest.mark.parametrize("stability_threshold, confidence_threshold", [(1, 0.005), (0, 1.0)])
def test_generate_matches_reference_tokens(tiny_ckpt, stability_threshold, confidence_threshold):
    """Same prompts, same injected noise: the same tokens, tokens-per-forward and stopping as the reference.
    (A random model's argmax never settles, so the second case stops on confidence alone, where rows stop at
    different steps; stability is checked against the reference criterion directly in test_sampler.py.)"""
    model = dgemma.load(tiny_ckpt, backend="cuda")
    ref = load_reference(tiny_ckpt)
    prompts = [list(range(5, 25)), list(range(40, 52))]
    seeds = [11, 12]
    kw = dict(max_new_tokens=48, max_denoising_steps=10, eos_token_ids=[1], pad_token_id=0,
              confidence_threshold=confidence_threshold, stability_threshold=stability_threshold)
    res = model.generate_batch(prompts, noises=[ScriptedNoise(s, model.backend.ops) for s in seeds], **kw)
    ids, mask = padded(prompts)
    with injected_noise(seeds, model.config.vocab_size, model.config.canvas_length):
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=48, max_denoising_steps=10, eos_token_id=[1],
                           pad_token_id=0, confidence_threshold=confidence_threshold,
                           stability_threshold=stability_threshold)
    for i in range(2):
        assert res[i].raw_token_ids == out.sequences[i, ids.shape[1]:].tolist()
        assert res[i].stats.tokens_per_forward == pytest.approx(out.tokens_per_forward[i].item(), rel=1e-6)
    if stability_threshold == 0:
        steps = [s for r in res for s in r.stats.steps_per_canvas]
        assert min(steps) < 10 and len(set(steps)) > 1, "adaptive stopping never triggered"


def test_generate_eos_and_padding(tiny_ckpt):
    """An eos id that the model emits early: everything after it is pad, the row stops, stats count it."""
    model = dgemma.load(tiny_ckpt, backend="cuda")
    ref = load_reference(tiny_ckpt)
    prompts = [list(range(5, 25)), list(range(40, 52))]
    seeds = [3, 4]
    probe = model.generate_batch(prompts, noises=[ScriptedNoise(s, model.backend.ops) for s in seeds],
                                 max_new_tokens=32, max_denoising_steps=6, eos_token_ids=[], pad_token_id=0)
    eos = probe[0].raw_token_ids[5]  # a token row 0 produces at position 5 of its first canvas
    kw = dict(max_new_tokens=48, max_denoising_steps=6, pad_token_id=0)
    res = model.generate_batch(prompts, noises=[ScriptedNoise(s, model.backend.ops) for s in seeds],
                               eos_token_ids=[eos], **kw)
    ids, mask = padded(prompts)
    with injected_noise(seeds, model.config.vocab_size, model.config.canvas_length):
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=48, max_denoising_steps=6, eos_token_id=[eos],
                           pad_token_id=0)
    for i in range(2):
        assert res[i].raw_token_ids == out.sequences[i, ids.shape[1]:].tolist()
    first = res[0].raw_token_ids.index(eos)
    assert first <= 5 and all(t == 0 for t in res[0].raw_token_ids[first + 1:])
    assert res[0].stats.finish_reason == "eos" and eos not in res[0].token_ids
    assert res[0].stats.canvases == 1


def test_seeded_row_is_batch_independent(tiny_ckpt):
    """With the backend's own RNG, a request gives the same tokens alone and inside a batch."""
    model = dgemma.load(tiny_ckpt, backend="cuda")
    kw = dict(max_new_tokens=32, max_denoising_steps=6, eos_token_ids=[1])
    alone = model.generate(list(range(40, 52)), seed=7, **kw)
    batch = model.generate_batch([list(range(5, 25)), list(range(40, 52))], seeds=[9, 7], **kw)
    assert batch[1].token_ids == alone.token_ids
    again = model.generate(list(range(40, 52)), seed=7, **kw)
    assert again.token_ids == alone.token_ids
    other = model.generate(list(range(40, 52)), seed=8, **kw)
    assert other.token_ids != alone.token_ids


def test_stream_yields_each_canvas(random_default):
    model = dgemma.load(random_default, backend="cuda")
    chunks = list(model.stream("hello", seed=1, max_new_tokens=70, max_denoising_steps=4, eos_token_ids=[]))
    full = model.generate("hello", seed=1, max_new_tokens=70, max_denoising_steps=4, eos_token_ids=[])
    assert len(chunks) == 3  # canvases of 32
    assert sum(len(c.token_ids) for c in chunks) == 70
    assert [t for c in chunks for t in c.token_ids] == full.token_ids
    assert "".join(c.text for c in chunks) == full.text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 17, 64), (2, 9, 4, 16), (5, 2816)])
def test_fused_rms_norm_is_the_reference_formula_bit_for_bit(dtype, shape):
    from dgemma.backends.cuda.model import rms_norm

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g).to(dtype), torch.randn(shape[-1], generator=g).to(dtype)
    for weight in (w, None):
        h = x.float()
        want = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5)
        want = (want if weight is None else want * weight.float()).type_as(x)
        assert torch.equal(rms_norm(x, weight, 1e-6), want)
