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
    """On the trained Sudoku model positions settle after a few passes: later passes forward only the rest, and a
    frozen position's argmax never changes again within its canvas."""
    from dgemma.engine import Engine, Request

    widths = []
    original = sudoku.backend.denoise_hidden

    def spy(cache, canvas, *a, **k):
        widths.append(canvas.shape[1])
        return original(cache, canvas, *a, **k)

    puzzle, solution = held_out_puzzles("hard", 1)[0]  # a puzzle that takes several passes
    engine = Engine(sudoku.backend)
    settings = sudoku.settings(max_denoising_steps=24)
    h = engine.submit(Request(encode_prompt(puzzle), settings, seed=0, speed="fast",
                              fast=FastPolicy(freeze_after=1, refresh_every=0)))
    held: dict[int, int] = {}
    sudoku.backend.denoise_hidden = spy
    try:
        while engine.busy:
            engine.step()
            for row in engine.rows:
                argmax = np.asarray(sudoku.backend.ops.to_numpy(row.argmax)).reshape(-1)
                for pos, tok in held.items():
                    assert argmax[pos] == tok, f"frozen position {pos} changed"
                held.update({int(p): int(argmax[p]) for p in np.flatnonzero(row.frozen)})
    finally:
        sudoku.backend.denoise_hidden = original
    C = sudoku.config.canvas_length
    assert held, "nothing froze: the test would prove nothing"
    assert widths[0] == C and min(widths) < C, widths
    assert len(decode_board(h.result.token_ids)) == 81


def test_fast_mode_refuses_structured_output(tiny_ckpt):
    model = dgemma.load(tiny_ckpt, backend="cuda")
    with pytest.raises(InputError, match="speed"):
        model.generate([5, 6, 7], seed=0, speed="turbo", **KW)
    with pytest.raises(ValueError, match="fast policy"):
        FastPolicy(freeze_after=0)
