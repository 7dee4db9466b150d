"""The one batch engine: rows join and leave, the prompt cache, hidden-space self-conditioning, vocabulary tiles."""

import numpy as np
import pytest

import dgemma
from dgemma.engine import Engine, PromptCache, Request
from dgemma.errors import InputError

KW = dict(max_new_tokens=32, max_denoising_steps=6, eos_token_ids=[], pad_token_id=0)
# The engine is backend-neutral: the fast tier runs it on PyTorch, the full run (CI) on both.
BACKENDS = ["cuda", pytest.param("mlx", marks=pytest.mark.slow)]


def settings(model, **kw):
    return model.settings(**{**KW, **kw})


def solo(model, prompt, seed, **kw):
    return model.generate(prompt, seed=seed, **{**KW, **kw})


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, tiny_ckpt):
    return dgemma.load(tiny_ckpt, backend=request.param)


def test_requests_joining_mid_flight_equal_solo_runs(model):
    """batching='exact': a request that joins while another is denoising gets what it gets alone, bit for bit."""
    engine = Engine(model.backend, batching="exact")
    a = engine.submit(Request(list(range(5, 25)), settings(model), seed=3))
    for _ in range(3):
        engine.step()
    b = engine.submit(Request(list(range(40, 52)), settings(model), seed=4))
    seen_both = False
    while engine.busy:
        engine.step()
        seen_both |= engine.stats()["rows"] == 2
    assert seen_both, "the two requests never shared the batch: the test would prove nothing"
    assert a.result.token_ids == solo(model, list(range(5, 25)), 3).token_ids
    assert b.result.token_ids == solo(model, list(range(40, 52)), 4).token_ids
    assert engine.stats()["rows"] == 0 and engine.cache.rows == 0


def test_merged_batch_of_different_lengths_runs_every_request_to_its_end(model):
    engine = Engine(model.backend)
    prompts = [list(range(5, 25)), list(range(40, 45)), list(range(60, 90))]
    handles = [engine.submit(Request(p, settings(model, max_new_tokens=16 * (i + 1)), seed=i))
               for i, p in enumerate(prompts)]
    while engine.busy:
        engine.step()
    for i, h in enumerate(handles):
        assert len(h.result.raw_token_ids) == 16 * (i + 1)
        assert h.result.finish_reason == "length"
    assert engine.counters["max_rows_seen"] == 3


def test_prompt_cache_hit_gives_the_same_answer(model):
    """A request whose prompt shares whole prefill chunks with an earlier one reuses them and answers exactly as
    without the cache; usage counts the reused tokens."""
    backend = model.backend
    old = backend.prefill_chunk
    backend.prefill_chunk = 8  # several chunks in a short prompt
    try:
        shared = list(range(100, 124))                       # three whole chunks
        first, second = shared + [7, 8, 9], shared + [30, 31, 32, 33, 34]
        engine = Engine(backend, prompt_cache=PromptCache(1 << 26))
        engine.submit(Request(first, settings(model), seed=1))
        h = engine.submit(Request(second, settings(model), seed=2))
        while engine.busy:
            engine.step()
        assert h.result.cached_tokens == 24
        cold = Engine(backend)
        c = cold.submit(Request(second, settings(model), seed=2))
        while cold.busy:
            cold.step()
        assert c.result.cached_tokens == 0
        assert h.result.raw_token_ids == c.result.raw_token_ids
        assert engine.prompt_cache.stats()["hits"] == 1
    finally:
        backend.prefill_chunk = old


def test_prompt_cache_stays_within_its_budget(model):
    backend = model.backend
    one_row = backend.prefill(np.arange(5, 25)[None]).nbytes()
    cache = PromptCache(3 * one_row)
    engine = Engine(backend, prompt_cache=cache)
    for i in range(6):
        engine.submit(Request(list(range(5 + i, 25 + i)), settings(model, max_new_tokens=16), seed=i))
    while engine.busy:
        engine.step()
    assert cache.bytes <= cache.byte_budget and cache.evictions > 0


def test_nothing_vocabulary_sized_outlives_a_pass(model):
    """Between passes a row keeps its canvas, argmax and the self-conditioning input in hidden space [C, H]."""
    engine = Engine(model.backend)
    engine.submit(Request(list(range(5, 25)), settings(model, max_denoising_steps=20), seed=1))
    engine.step()
    engine.step()
    V, H, C = model.config.vocab_size, model.config.hidden_size, model.config.canvas_length
    row = engine.rows[0]
    assert tuple(row.soft.shape) == (C, H)
    for value in vars(row).values():
        shape = tuple(getattr(value, "shape", ()))
        assert V not in shape, f"a {shape} array is kept between passes"


def test_vocabulary_tiles_give_the_same_tokens(model):
    prompts = [list(range(5, 25)), list(range(40, 52)), list(range(60, 70))]
    whole = model.generate_batch(prompts, seeds=[1, 2, 3], **KW)
    engine = Engine(model.backend, vocab_tile_bytes=1)  # one row per tile
    handles = engine.submit_group([Request(p, settings(model), seed=s) for p, s in zip(prompts, [1, 2, 3])])
    while engine.busy:
        engine.step()
    assert [h.result.token_ids for h in handles] == [g.token_ids for g in whole]


def test_cancelled_request_leaves_and_frees_its_rows(model):
    engine = Engine(model.backend)
    a = engine.submit(Request(list(range(5, 25)), settings(model, max_new_tokens=64), seed=1))
    b = engine.submit(Request(list(range(40, 52)), settings(model, max_new_tokens=64), seed=2))
    engine.step()
    engine.cancel(a)
    while engine.busy:
        engine.step()
    assert a.result is None and b.result is not None
    assert engine.counters["cancelled"] == 1 and engine.cache.rows == 0


def test_bad_requests_are_refused_at_submit(model):
    engine = Engine(model.backend)
    with pytest.raises(InputError, match="outside the vocabulary"):
        engine.submit(Request([5, model.config.vocab_size], settings(model), seed=1))
    with pytest.raises(InputError, match="checker"):
        engine.submit(Request([5, 6], settings(model), seed=1, attempts=2))
    with pytest.raises(InputError, match="positions"):
        engine.submit(Request([5] * model.config.max_position_embeddings, settings(model), seed=1))


def test_the_core_never_imports_a_framework():
    """dgemma/ (the core, the engine, the faces) imports neither torch nor mlx, lazily or not: the source says so."""
    import re
    from pathlib import Path

    root = Path(dgemma.__file__).parent
    pattern = re.compile(r"^\s*(import|from)\s+(torch|mlx)\b|import_module\(\s*['\"](torch|mlx)", re.M)
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if pattern.search(p.read_text())]
    assert not offenders, offenders


def test_a_task_model_refuses_other_prompts_through_the_api():
    """dgemma.load() (the Sudoku model) refuses a text question with the CLI's error instead of returning digits."""
    model = dgemma.load()
    with pytest.raises(InputError, match="Sudoku"):
        model.generate("Why is the sky blue?")
