"""Parallel attempts and stop-when-valid: K canvases of one request denoised side by side, the first that passes the
checker kept; a canvas that passes a verifying checker stops at once. On the tiny random model (PyTorch, CPU)."""

import numpy as np
import pytest

import dgemma
from dgemma.errors import InputError
from dgemma.sampler import ScriptedNoise
from dgemma.engine import attempt_seed

KW = dict(max_new_tokens=16, max_denoising_steps=6, eos_token_ids=[], pad_token_id=None)
TWO_BLOCKS = dict(KW, max_new_tokens=32)
PROMPT = list(range(5, 25))
PASS = lambda row, tokens: np.zeros(tokens.shape, dtype=bool)  # noqa: E731 - nothing is flagged
FAIL = lambda row, tokens: np.ones(tokens.shape, dtype=bool)  # noqa: E731 - everything is flagged


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return dgemma.load(tiny_ckpt, backend="cuda")


def even_first(row, tokens):
    """Passes a canvas whose first token is even; flags only position 0 otherwise (the rest may settle)."""
    out = np.zeros(tokens.shape, dtype=bool)
    out[0] = int(tokens[0]) % 2 == 1
    return out


def test_one_attempt_draws_what_a_plain_call_draws(model):
    assert attempt_seed(123, 0) == 123 and attempt_seed(123, 1) != attempt_seed(123, 2)
    plain = model.generate_batch([PROMPT, PROMPT[:7]], seeds=[5, 6], **KW)
    one = model.generate_batch([PROMPT, PROMPT[:7]], seeds=[5, 6], checker=PASS, attempts=1, **KW)
    assert [g.raw_token_ids for g in one] == [g.raw_token_ids for g in plain]
    assert all(g.stats.attempts == 1 and g.stats.chosen for g in one)


def test_stop_when_valid_ends_a_passing_canvas_after_one_pass(model):
    gen = model.generate(PROMPT, seed=3, checker=PASS, stop_when_valid=True, **TWO_BLOCKS)
    assert gen.stats.steps_per_canvas == [1, 1] and gen.stats.decoder_passes == 2
    slow = model.generate(PROMPT, seed=3, checker=FAIL, stop_when_valid=True, **KW)
    assert slow.stats.steps_per_canvas[0] > 1  # nothing passes: the ordinary rule (or the step limit) ends it


def test_groups_keep_the_attempt_that_passes(model):
    """Three differently encoded attempts at one request; only the third passes, at its first pass: it is kept, the
    group stops there, the others retire after the first canvas, and every row is charged the group's passes."""
    prompts = [PROMPT, PROMPT[1:], PROMPT[2:]]
    res = model.generate_batch(prompts, seeds=[1, 2, 3], groups=[7, 7, 7], stop_when_valid=True,
                               checker=lambda row, t: np.full(t.shape, row != 2), **TWO_BLOCKS)
    assert [g.stats.chosen for g in res] == [False, False, True]
    assert res[2].stats.steps_per_canvas == [1, 1]
    assert res[0].stats.steps_per_canvas == [1] and res[1].stats.steps_per_canvas == [1]
    assert {g.stats.decoder_passes for g in res} == {2}
    assert all(g.stats.attempts == 3 for g in res)


def test_attempts_keep_the_first_passing_canvas_of_the_solo_runs(model):
    """Each attempt draws the noise of a solo run seeded attempt_seed(seed, a), so the group's answer is the canvas of
    the solo run that passes soonest (lowest attempt among equals), after the same number of passes."""
    K, seed = 4, 21
    solo = [model.generate(PROMPT, seed=attempt_seed(seed, a), checker=even_first, stop_when_valid=True, **KW)
            for a in range(K)]
    steps = [g.stats.steps_per_canvas[0] for g in solo]
    passed = [a for a in range(K) if not even_first(0, np.array(solo[a].raw_token_ids)).any()]
    assert passed, "no attempt passed: pick another seed, the test would prove nothing"
    winner = min(passed, key=lambda a: (steps[a], a))
    got = model.generate(PROMPT, seed=seed, checker=even_first, stop_when_valid=True, attempts=K, **KW)
    assert got.raw_token_ids == solo[winner].raw_token_ids
    assert got.stats.steps_per_canvas == [steps[winner]] and got.stats.attempts == K


def test_attempts_of_one_prompt_continue_together_over_blocks(model):
    """With a shared prompt every attempt carries the kept canvas into the next block, so the second block is again
    denoised as K attempts per prompt, and the first block is what a one-block run keeps."""
    rows_per_block = {}
    on_step = lambda block, step, argmax, accepted: rows_per_block.setdefault(block, set()).add(  # noqa: E731
        tuple(argmax.shape)[0])
    two = model.generate_batch([PROMPT, PROMPT[3:]], seeds=[8, 9], checker=even_first, stop_when_valid=True,
                               attempts=3, on_step=on_step, **TWO_BLOCKS)
    one = model.generate_batch([PROMPT, PROMPT[3:]], seeds=[8, 9], checker=even_first, stop_when_valid=True,
                               attempts=3, **KW)
    assert rows_per_block == {0: {3}, 1: {3}}  # on_step sees one request's rows: its 3 attempts, in both blocks
    for g, first in zip(two, one):
        assert g.raw_token_ids[:16] == first.raw_token_ids
        assert len(g.stats.steps_per_canvas) == 2 and g.stats.chosen
        assert g.stats.decoder_passes == sum(g.stats.steps_per_canvas)


def test_attempts_need_a_checker_and_seeds(model):
    with pytest.raises(InputError, match="need a checker"):
        model.generate(PROMPT, seed=1, attempts=2, **KW)
    with pytest.raises(InputError, match="attempts must be"):
        model.generate(PROMPT, seed=1, checker=PASS, attempts=0, **KW)
    with pytest.raises(InputError, match="seeds, not noise"):
        model.generate(PROMPT, noise=ScriptedNoise(1, model.backend.ops), checker=PASS, attempts=2, **KW)
    with pytest.raises(InputError, match="either attempts or groups"):
        model.generate_batch([PROMPT], seeds=[1], checker=PASS, attempts=2, groups=[0], **KW)
    with pytest.raises(InputError, match="group ids"):
        model.generate_batch([PROMPT], seeds=[1], checker=PASS, groups=[0, 1], **KW)


def test_a_checker_with_many_is_called_once_per_step_and_agrees(model):
    class Batched:
        calls = 0

        def __call__(self, row, tokens):
            raise AssertionError("the per-row call should not be used when many() exists")

        def many(self, rows, tokens):
            Batched.calls += 1
            assert tokens.shape == (len(rows), 16)
            return np.stack([even_first(int(r), t) for r, t in zip(rows, tokens)])

    per_row = model.generate_batch([PROMPT, PROMPT[2:]], seeds=[4, 5], checker=even_first, stop_when_valid=True,
                                   attempts=3, **KW)
    batched = model.generate_batch([PROMPT, PROMPT[2:]], seeds=[4, 5], checker=Batched(), stop_when_valid=True,
                                   attempts=3, **KW)
    assert [g.raw_token_ids for g in batched] == [g.raw_token_ids for g in per_row]
    assert 0 < Batched.calls <= 3 * KW["max_denoising_steps"] + 1


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
@pytest.mark.slow
def test_rows_that_stop_leave_the_batch_without_changing_any_row(tiny_ckpt, backend):
    """Rows stop at different passes (stop_when_valid on a checker that passes row r from its r-th pass on): the
    engine drops them from the batch (later passes run over fewer rows), and every row's tokens and passes are what
    it gives when run alone."""
    m = dgemma.load(tiny_ckpt, backend=backend)
    prompts = [PROMPT, PROMPT[2:], PROMPT[4:], PROMPT[6:]]
    passes = {}

    def staggered(row, tokens):
        passes[row] = passes.get(row, 0) + 1
        return np.full(tokens.shape, passes[row] <= 2 * row)

    widths = []
    original = m.backend.denoise_hidden
    m.backend.denoise_hidden = lambda cache, canvas, *a, **k: widths.append(canvas.shape[0]) or original(
        cache, canvas, *a, **k)
    try:
        batched = m.generate_batch(prompts, seeds=[1, 2, 3, 4], checker=staggered, stop_when_valid=True, **KW)
    finally:
        m.backend.denoise_hidden = original
    alone = []
    for i, p in enumerate(prompts):
        passes.clear()
        passes.update({r: 0 for r in range(4)})
        rowwise = lambda row, tokens, i=i: staggered(i, tokens)  # noqa: E731 - the row's own index
        alone.append(m.generate(p, seed=i + 1, checker=rowwise, stop_when_valid=True, **KW))
    assert widths[0] == 4 and min(widths) < 4 and widths == sorted(widths, reverse=True), widths
    assert [g.token_ids for g in batched] == [g.token_ids for g in alone]
    assert [g.stats.decoder_passes for g in batched] == [g.stats.decoder_passes for g in alone]
    assert len({g.stats.decoder_passes for g in batched}) > 1


def test_renoise_off_leaves_the_canvas_to_the_sampler(model):
    """renoise=False: a checker that flags everything changes nothing while denoising (it only judges the finished
    canvas), where renoise=True re-noises every accepted token."""
    plain = model.generate_batch([PROMPT, PROMPT[5:]], seeds=[3, 4], **KW)
    judged = model.generate_batch([PROMPT, PROMPT[5:]], seeds=[3, 4], checker=FAIL, renoise=False, **KW)
    renoised = model.generate_batch([PROMPT, PROMPT[5:]], seeds=[3, 4], checker=FAIL, **KW)
    assert [g.raw_token_ids for g in judged] == [g.raw_token_ids for g in plain]
    assert [g.stats.decoder_passes for g in judged] == [g.stats.decoder_passes for g in plain]
    assert [g.raw_token_ids for g in renoised] != [g.raw_token_ids for g in plain]
