"""Constraint-aware sampling: a checker marks canvas positions that break a task's constraints; accepted tokens there
are re-noised, and a finished canvas that still breaks one is denoised again (bounded)."""

import numpy as np
import pytest

import dgemma
from dgemma.errors import InputError
from dgemma.sampler import ScriptedNoise

KW = dict(max_new_tokens=16, max_denoising_steps=5, eos_token_ids=[], pad_token_id=None)
PROMPTS = [list(range(5, 25)), list(range(40, 52))]


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return dgemma.load(tiny_ckpt, backend="cuda")


def noises(model, seeds=(11, 12)):
    return [ScriptedNoise(s, model.backend.ops) for s in seeds]


@pytest.mark.slow
def test_a_checker_that_finds_nothing_changes_nothing(model):
    calls = []

    def checker(row, tokens):
        calls.append((row, tokens.shape))
        return np.zeros(tokens.shape, dtype=bool)

    plain = model.generate_batch(PROMPTS, noises=noises(model), **KW)
    checked = model.generate_batch(PROMPTS, noises=noises(model), checker=checker, max_retries=2, **KW)
    assert [r.raw_token_ids for r in checked] == [r.raw_token_ids for r in plain]
    assert all(r.stats.retries == 0 for r in checked)
    assert {row for row, _ in calls} == {0, 1} and all(shape == (16,) for _, shape in calls)


def test_flagged_accepted_tokens_are_renoised(model):
    """Flag position 3 always: whenever the sampler accepted it, the next canvas holds that step's noise token."""
    seen = []
    original = model.backend.denoise

    def spy(state, canvas, *a, **k):
        seen.append(np.asarray(model.backend.ops.to_numpy(canvas)).copy())
        return original(state, canvas, *a, **k)

    accepted = []
    model.backend.denoise = spy
    try:
        flag = np.zeros(16, dtype=bool)
        flag[3] = True
        model.generate_batch(PROMPTS, noises=noises(model), checker=lambda row, t: flag, max_retries=0,
                             on_step=lambda b, s, am, acc: accepted.append(np.asarray(acc).copy()), **KW)
    finally:
        model.backend.denoise = original
    nz = noises(model)
    for step in range(1, len(seen)):  # canvas fed to pass `step + 1` came out of pass `step`
        for row in range(2):
            renoise = nz[row].tokens_np(0, step, 16, model.config.vocab_size)
            assert seen[step][row, 3] == renoise[3], (step, row)
            # Positions not flagged and accepted keep the sampled token rather than fresh noise somewhere.
    assert any(a[:, 3].any() for a in accepted), "position 3 was never accepted: the test would prove nothing"


@pytest.mark.slow
def test_retries_are_bounded_and_counted(model):
    always = lambda row, tokens: np.ones(tokens.shape, dtype=bool)  # noqa: E731 - nothing can satisfy it
    res = model.generate_batch(PROMPTS, noises=noises(model), checker=always, max_retries=2, **KW)
    plain = model.generate_batch(PROMPTS, noises=noises(model), **KW)
    for r, p in zip(res, plain):
        assert r.stats.retries == 2
        assert r.stats.decoder_passes > p.stats.decoder_passes
        assert r.stats.decoder_passes <= 3 * KW["max_denoising_steps"]


def test_retry_only_for_failing_rows(model):
    """Row 1 always fails, row 0 never: only row 1 is re-denoised; row 0's tokens are those of a plain run."""
    res = model.generate_batch(PROMPTS, noises=noises(model), max_retries=1,
                               checker=lambda row, t: np.full(t.shape, row == 1), **KW)
    plain = model.generate_batch(PROMPTS, noises=noises(model), **KW)
    assert res[0].raw_token_ids == plain[0].raw_token_ids and res[0].stats.retries == 0
    assert res[1].stats.retries == 1


def test_negative_retries_rejected(model):
    with pytest.raises(InputError, match="max_retries"):
        model.generate(PROMPTS[0], checker=lambda r, t: np.zeros(t.shape, bool), max_retries=-1, **KW)
