"""speed="fast": denoise only the positions still changing (dgemma.engine.FastPolicy), on both backends."""

import numpy as np
import pytest

import dgemma
from dgemma.engine import FastPolicy
from dgemma.errors import InputError
from dgemma.sudoku_task import decode_board, encode_prompt, held_out_puzzles

KW = dict(max_new_tokens=32, max_denoising_steps=8, eos_token_ids=[], pad_token_id=0)
NEVER_FREEZE = FastPolicy(freeze_after=10**6, refresh_every=1)


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_fast_mode_with_nothing_frozen_equals_exact_mode(tiny_ckpt, backend):
    model = dgemma.load(tiny_ckpt, backend=backend)
    prompts = [list(range(5, 25)), list(range(40, 52))]
    exact = model.generate_batch(prompts, seeds=[1, 2], **KW)
    fast = model.generate_batch(prompts, seeds=[1, 2], speed="fast", fast=NEVER_FREEZE, **KW)
    assert [g.raw_token_ids for g in fast] == [g.raw_token_ids for g in exact]
    assert [g.stats.steps_per_canvas for g in fast] == [g.stats.steps_per_canvas for g in exact]


@pytest.fixture(scope="module", params=["cuda", "mlx"])
def sudoku(request):
    return dgemma.load(None, backend=request.param)


def test_fast_mode_forwards_fewer_positions_and_frozen_ones_hold(sudoku):
    """On the trained Sudoku model positions settle after a few passes: later passes forward only the rest; a
    position keeps its token while it stays frozen and thaws only on a full pass, and after a full pass every frozen
    position is still sure (entropy under freeze_entropy); the canvas stops on a full pass (the stopping rule sees
    every position anew) unless it ran out of steps."""
    from dgemma.engine import Engine, Request

    widths = []
    original = sudoku.backend.denoise_hidden

    def spy(cache, canvas, *a, **k):
        widths.append(canvas.shape[1])
        return original(cache, canvas, *a, **k)

    puzzle, solution = held_out_puzzles("hard", 1)[0]  # a puzzle that takes several passes
    engine = Engine(sudoku.backend)
    settings = sudoku.settings(max_denoising_steps=24)
    policy = FastPolicy(freeze_after=1, refresh_every=0)
    h = engine.submit(Request(encode_prompt(puzzle), settings, seed=0, speed="fast", fast=policy))
    C = sudoku.config.canvas_length
    before = None  # (frozen, argmax) after the previous pass
    froze = thawed = 0
    sudoku.backend.denoise_hidden = spy
    try:
        while engine.busy:
            engine.step()
            for row in engine.rows:
                if not row.live and row.frozen is None:
                    continue
                argmax = np.asarray(sudoku.backend.ops.to_numpy(row.argmax)).reshape(-1)
                frozen = row.frozen.copy()
                if before is not None:
                    kept = before[0] & frozen
                    assert (argmax[kept] == before[1][kept]).all(), "a frozen position changed"
                    if (before[0] & ~frozen).any():
                        thawed += 1
                        assert widths[-1] == C, "a position thawed on a partial pass"
                if widths[-1] == C:
                    assert (row.pos_entropy[frozen & ~row.just_froze] < policy.freeze_entropy).all()
                froze += int(frozen.sum())
                before = (frozen, argmax)
    finally:
        sudoku.backend.denoise_hidden = original
    assert froze, "nothing froze: the test would prove nothing"
    assert widths[0] == C and min(widths) < C, widths
    steps = h.result.steps_per_canvas[0]
    assert widths[-1] == C or steps == settings.max_denoising_steps, (widths, steps)
    assert len(decode_board(h.result.token_ids)) == 81


def test_fast_mode_refuses_structured_output(tiny_ckpt):
    model = dgemma.load(tiny_ckpt, backend="cuda")
    with pytest.raises(InputError, match="speed"):
        model.generate([5, 6, 7], seed=0, speed="turbo", **KW)
    with pytest.raises(ValueError, match="fast policy"):
        FastPolicy(freeze_after=0)


@pytest.mark.parametrize("backend", ["cuda", pytest.param("mlx", marks=pytest.mark.slow)])  # MLX: 25 s of traces
def test_a_batch_runs_rows_of_different_widths_in_passes_of_their_own(backend):
    """An exact-mode row needs every position at every pass; beside it, fast rows' frozen positions would be
    forwarded as padding. Once six fast rows save more than a pass costs (~130 positions on a CPU), the engine runs
    them in a pass of their own; the exact row's tokens are those it gets alone, and with an infinite pass cost (a
    GPU) the batch keeps one pass."""
    from dgemma.engine import Engine, Request

    sudoku = dgemma.load(None, backend=backend)
    puzzle, _ = held_out_puzzles("hard", 1)[0]
    settings = sudoku.settings(max_denoising_steps=16)
    alone = sudoku.generate(encode_prompt(puzzle), seed=3, max_denoising_steps=16).raw_token_ids
    C = sudoku.config.canvas_length
    original = sudoku.backend.denoise_hidden
    for cost, split in ((sudoku.backend.pass_cost_tokens, True), (float("inf"), False)):
        calls: list[list[tuple[int, int]]] = []
        engine = Engine(sudoku.backend)

        def spy(cache, canvas, *a, rows=None, **k):
            calls[-1].append((rows.stop - rows.start, canvas.shape[1]))
            return original(cache, canvas, *a, rows=rows, **k)

        exact, *fast = engine.submit_group([Request(encode_prompt(puzzle), settings, seed=3)] + [
            Request(encode_prompt(puzzle), settings, seed=4 + i, speed="fast", fast=FastPolicy(freeze_after=1))
            for i in range(6)])
        sudoku.backend.denoise_hidden, sudoku.backend.pass_cost_tokens = spy, cost
        try:
            while engine.busy:
                calls.append([])
                engine.step()
        finally:
            sudoku.backend.denoise_hidden = original
            del sudoku.backend.pass_cost_tokens  # back to the class's value
        two = [c for c in calls if len(c) == 2]
        if split:
            assert two and all(c[0][1] == C and c[1][1] < C and c[0][0] + c[1][0] == 7 for c in two), calls
            assert (1, C) in (c[0] for c in two)
        else:
            assert all(len(c) <= 1 for c in calls), calls
        assert exact.result.raw_token_ids == alone
        assert all(len(decode_board(h.result.token_ids)) == 81 for h in fast)
