"""The core sampler's pieces against the reference's own functions on the same inputs."""

import numpy as np
import pytest
import torch

from dgemma.backends.cuda import TorchOps
from dgemma.sampler import (StableAndConfident, ScriptedNoise, denoise_step, entropy_bound_accept,
                            entropy_from_log_probs, temperature)

gen = pytest.importorskip("transformers.models.diffusion_gemma.generation_diffusion_gemma")
ops = TorchOps(torch.device("cpu"))


def logits_batch(seed, B=3, C=64, V=200, spread=4.0):
    g = torch.Generator().manual_seed(seed)
    # Rows of very different sharpness so the entropy bound accepts anywhere from none to all positions.
    scale = torch.exp(torch.linspace(-1, 3, C))[None, :, None]
    return torch.randn(B, C, V, generator=g) * spread * scale


@pytest.mark.parametrize("N", [1, 7, 48])
def test_temperature_schedule_matches_reference(N):
    proc = gen.LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=N)
    x = logits_batch(0)
    for k in range(N, 0, -1):
        want = proc(None, x, cur_step=torch.tensor(k, dtype=torch.int32))
        got = x / temperature(k, N, 0.4, 0.8)
        assert torch.equal(got, want), f"step {k}"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bound", [0.01, 0.1, 1.0, 30.0])
def test_entropy_and_acceptance_match_reference(seed, bound):
    x = logits_batch(seed)
    lp = ops.log_softmax(x)
    ent = entropy_from_log_probs(ops, lp, ops.softmax(lp))
    assert torch.equal(ent, torch.distributions.Categorical(logits=x).entropy())
    sampler = gen.EntropyBoundSampler(gen.EntropyBoundSamplerConfig(entropy_bound=bound), 64, 200, 10)
    current = torch.randint(0, 200, (3, 64), generator=torch.Generator().manual_seed(seed))
    proposal = torch.randint(0, 200, (3, 64), generator=torch.Generator().manual_seed(seed + 100))
    accepted_ref = sampler.accept_canvas(current, proposal, x, cur_step=1)
    mask = entropy_bound_accept(ops, ent, bound)
    assert torch.equal(mask, sampler.accepted_token_mask)
    assert torch.equal(torch.where(mask, proposal, current), accepted_ref)
    # Re-noise: every position not accepted gets the random token, the accepted ones keep theirs.
    noise = torch.randint(0, 200, (3, 64), generator=torch.Generator().manual_seed(seed + 200))
    sampler.initialize_canvas = lambda batch_size, device: noise
    assert torch.equal(sampler.renoise_canvas(accepted_ref, cur_step=1), torch.where(mask, proposal, noise))


def test_acceptance_covers_none_some_and_all():
    counts = set()
    for bound in (1e-9, 0.5, 1e6):
        x = logits_batch(0, spread=1.0)
        lp = ops.log_softmax(x)
        counts.add(int(entropy_bound_accept(ops, entropy_from_log_probs(ops, lp, ops.softmax(lp)), bound).sum()))
    # The lowest-entropy position is always accepted (its cumsum minus itself is 0), the bound decides the rest.
    assert min(counts) == 3 and max(counts) == 3 * 64 and len(counts) == 3


def test_denoise_step_matches_reference_pieces():
    x = logits_batch(5)
    canvas = torch.randint(0, 200, (3, 64))
    nz = [ScriptedNoise(s, ops) for s in (1, 2, 3)]
    u = torch.stack([n.uniforms(0, 1, 64) for n in nz])
    r = torch.stack([n.tokens(0, 1, 64, 200) for n in nz])
    res = denoise_step(ops, x, canvas, steps_remaining=5, max_steps=8, t_min=0.4, t_max=0.8, entropy_bound=0.1,
                       uniforms=u, renoise_tokens=r)
    processed = gen.LinearTemperatureScheduleLogitsProcessor(0.4, 0.8, 8)(None, x, cur_step=torch.tensor(5))
    assert torch.equal(res.argmax, processed.argmax(-1))
    assert torch.allclose(res.probs, torch.softmax(processed, -1), atol=1e-7)
    # Inverse-CDF sampling: the drawn token's CDF interval contains u.
    cdf = torch.cumsum(torch.softmax(processed, -1), -1)
    tok = ops.sample_categorical(res.probs, u)
    hi = cdf.gather(-1, tok[..., None])[..., 0]
    lo = hi - torch.softmax(processed, -1).gather(-1, tok[..., None])[..., 0]
    assert bool(((lo <= u + 1e-6) & (u <= hi + 1e-6)).all())
    sampler = gen.EntropyBoundSampler(gen.EntropyBoundSamplerConfig(entropy_bound=0.1), 64, 200, 8)
    accepted = sampler.accept_canvas(canvas, tok, processed, 5)
    assert torch.equal(res.accepted, sampler.accepted_token_mask)
    assert torch.equal(res.canvas, torch.where(res.accepted, accepted, r))
    assert torch.allclose(res.mean_entropy, torch.distributions.Categorical(logits=processed).entropy().mean(-1))


@pytest.mark.parametrize("stability", [0, 1, 2, 3])
def test_stopping_matches_reference(stability):
    """Feed both criteria the same sequence of argmax canvases and logits; they stop the same rows at the same step."""
    g = torch.Generator().manual_seed(stability)
    ref = gen.StableAndConfidentStoppingCriteria(stability_threshold=stability, confidence_threshold=0.5)
    ours = StableAndConfident(ops, stability, 0.5)
    base = torch.randint(0, 50, (4, 16), generator=g)
    for step in range(8):
        argmax = base.clone()
        argmax[0, step % 16] = step  # row 0 keeps changing
        if step < 3:
            argmax[1] = torch.randint(0, 50, (16,), generator=g)  # row 1 settles after step 2
        sharp = 30.0 if step >= 2 else 0.5  # confident from step 2 on
        logits = torch.randn(4, 16, 50, generator=g) * sharp
        logits[3] *= 0.01  # row 3 is never confident
        want = ref(argmax, logits)
        lp = ops.log_softmax(logits)
        got = ours(argmax, ops.mean(entropy_from_log_probs(ops, lp, ops.softmax(lp))))
        assert torch.equal(got, want), f"step {step}: {got} vs {want}"


def test_scripted_noise_is_order_free():
    a, b = ScriptedNoise(5), ScriptedNoise(5)
    first = a.tokens_np(2, 3, 8, 100)
    b.uniforms_np(0, 0, 8)
    assert np.array_equal(b.tokens_np(2, 3, 8, 100), first)
    assert not np.array_equal(ScriptedNoise(6).tokens_np(2, 3, 8, 100), first)


# -- the PyTorch backend's chunked sampler (backends/cuda/sampling.py): the same step in fewer passes ----------------
from backends.cuda.sampling import ChunkedSampler, logsumexp  # noqa: E402
from dgemma.sampler import step_with_temperature  # noqa: E402


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 10**6])  # one position per chunk, a ragged last chunk, whole rows
@pytest.mark.parametrize("per_row_t", [False, True])
def test_chunked_sampler_is_the_op_by_op_step_bit_for_bit(chunk_rows, per_row_t):
    x = logits_batch(3, V=4096, spread=0.2)  # flat rows too, where a CDF summed in another order draws otherwise
    x[1, 5, 17:] = float("-inf")  # a constrained position: only 17 tokens allowed
    x[2, 0] = 1.5  # a flat row: every token ties for the argmax
    x[2, 1, [9, 700, 4000]] = 99.0  # a tie between three tokens: the first wins
    g = torch.Generator().manual_seed(9)
    canvas, fresh = torch.randint(0, 4096, (3, 64), generator=g), torch.randint(0, 4096, (3, 64), generator=g)
    u = torch.rand(3, 64, generator=g)
    t = torch.tensor([0.5, 0.7, 0.9])[:, None, None] if per_row_t else 0.6
    bound = torch.tensor([[0.1], [1.0], [30.0]]) if per_row_t else 0.5
    before = x.clone()
    want = step_with_temperature(ops, x.clone(), canvas, t, bound, u, fresh, owns_logits=True)
    got = ChunkedSampler(ops, chunk_bytes=chunk_rows * 4096 * 4)(x, canvas, t, bound, u, fresh)
    for name, w, o in zip(("canvas", "argmax", "probs", "mean_entropy", "accepted", "entropy"), want, got):
        assert torch.equal(w, o), name
    assert int(ops.sample_categorical(got[2][1, 5], u[1, 5])) < 17  # never a token the mask removed
    assert torch.equal(x, before)  # the caller's logits are not written


def test_chunked_sampler_reuses_its_probs_buffer_only_when_asked():
    x = logits_batch(1)
    args = (torch.zeros(3, 64, dtype=torch.long), 0.6, 0.5, torch.rand(3, 64), torch.zeros(3, 64, dtype=torch.long))
    sampler = ChunkedSampler(ops)
    a, b = sampler(x, *args, reuse=True)[2], sampler(x * 2, *args, reuse=True)[2]
    assert a.data_ptr() == b.data_ptr()
    c, d = sampler(x, *args)[2], sampler(x, *args)[2]
    assert c.data_ptr() != d.data_ptr() and torch.equal(c, d)


def test_engine_reuses_the_vocabulary_buffers_between_passes_and_frees_them_when_idle(tiny_ckpt):
    import dgemma

    model = dgemma.load(tiny_ckpt, backend="cuda")
    seen, original = [], model.backend.lm_logits

    def spy(hidden):
        out = original(hidden)
        seen.append({role: b.data_ptr() for role, b in model.backend.ops.workspace._buffers.items()} | {
            "returned": out.data_ptr()})
        return out

    model.backend.lm_logits = spy
    model.generate(list(range(5, 25)), seed=0, max_new_tokens=32, max_denoising_steps=6, eos_token_ids=[])
    # From the second pass on (the first makes the sampler's buffers) every pass uses the same buffers.
    assert len(seen) >= 3 and {"logits", "probs", "chunk"} <= set(seen[1]) and all(s == seen[1] for s in seen[2:])
    assert seen[1]["returned"] == seen[1]["logits"]
    assert model.backend.ops.workspace._buffers == {}


def test_logsumexp_with_scratch_is_torchs_bit_for_bit():
    x = logits_batch(2, V=1000).reshape(-1, 1000)
    x[0, 3], x[1], x[2, :10] = float("inf"), float("-inf"), float("-inf")
    assert torch.equal(logsumexp(x, torch.empty_like(x)), torch.logsumexp(x, -1, keepdim=True))
