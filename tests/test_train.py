"""Fine-tuning (backends/cuda/train.py) and the Sudoku task encoding (dgemma/sudoku_task.py), on tiny models."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dgemma  # noqa: E402
from dgemma.backends.cuda.train import (TrainConfig, Trainer, apply_lora, decode_train, diffusion_loss,  # noqa: E402
                                        encode_train, export_hf, load_lora, lora_modules, merge_lora, new_model,
                                        save_lora)
from dgemma.sudoku import generate_dataset, is_valid_solution, violations  # noqa: E402
from dgemma.sudoku_task import (BOS, CANVAS_LENGTH, CELL_IDS, DIGIT_IDS, EOS, PAD, PROMPT_LENGTH,  # noqa: E402
                                SEP, VOCAB_SIZE, build_tokenizer_json, decode_solution, encode_batch, encode_prompt, encode_target, make_checker,
                                sudoku_generation_config, sudoku_model_config, write_tokenizer)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
            intermediate_size=64, num_attention_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def pairs():
    return generate_dataset(24, "easy", seed=5)


@pytest.fixture(scope="module")
def config():
    return sudoku_model_config(**TINY)


def batch(pairs, n=8):
    p, t = encode_batch(pairs[:n])
    return torch.tensor(p), torch.tensor(t)


# -- the task encoding ------------------------------------------------------------------------------------------------

def test_prompt_target_and_tokenizer_agree(pairs):
    from tokenizers import Tokenizer

    puzzle, solution = pairs[0]
    ids = encode_prompt(puzzle)
    assert len(ids) == PROMPT_LENGTH == 164 and ids[0] == BOS and ids[82] == SEP
    assert ids[83:] == list(CELL_IDS)  # the cell landmarks: canvas cell i sits 81 positions after CELL_IDS[i]
    tok = Tokenizer.from_str(build_tokenizer_json())
    assert tok.encode(puzzle).ids == ids
    grid = "\n".join(puzzle[r * 9:r * 9 + 9].replace(".", "0") for r in range(9))  # whitespace and '0' blanks
    assert tok.encode(grid).ids == ids
    target = encode_target(solution)
    assert len(target) == CANVAS_LENGTH == 82 and target[81] == EOS
    padded = encode_target(solution, 96)
    assert padded[:82] == target and set(padded[82:]) == {PAD}
    assert set(target[:81]) <= set(DIGIT_IDS)
    assert decode_solution(target) == solution and tok.decode(target) == solution
    assert max(ids + target) < VOCAB_SIZE


def test_checker_flags_rule_breaks_overwritten_givens_and_format(pairs):
    puzzle, solution = pairs[0]
    check = make_checker([puzzle, pairs[1][0]])
    good = np.array(encode_target(solution))
    assert not check(0, good).any()
    assert check(1, good).any()  # another puzzle's givens are overwritten
    given = puzzle.index(next(c for c in puzzle if c != "."))
    blank = puzzle.index(".")
    bad = good.copy()
    other = (int(solution[blank]) % 9) + 1  # a different digit in a blank cell: clashes in its row/col/box
    bad[blank] = DIGIT_IDS[other - 1]
    flagged = set(np.flatnonzero(check(0, bad)))
    board = decode_solution(bad)
    assert flagged == violations(board, puzzle) and blank in flagged
    bad = good.copy()
    bad[given] = PAD  # a given wiped out
    assert given in set(np.flatnonzero(check(0, bad)))
    bad = good.copy()
    bad[81] = DIGIT_IDS[0]  # no eos after the grid
    assert set(np.flatnonzero(check(0, bad))) == {81}
    assert not make_checker([puzzle], strict_format=False)(0, bad).any()


@pytest.mark.parametrize("strict", [True, False])
def test_batched_checker_is_the_rules_of_dgemma_sudoku(pairs, strict):
    """The numpy checker (`many`, and the per-row call built on it) against `dgemma.sudoku.violations` plus the format
    rules, on corrupted solutions of several puzzles and canvases of several widths."""
    puzzles = [p for p, _ in pairs[:6]]
    check = make_checker(puzzles, strict_format=strict)
    rng = np.random.default_rng(0)
    rows, canvases, expected = [], [], []
    for trial in range(200):
        r = int(rng.integers(len(puzzles)))
        toks = np.array(encode_target(pairs[r][1], 90))
        k = int(rng.integers(0, 30))
        toks[rng.integers(0, 90, size=k)] = rng.integers(0, 20, size=k)
        for width in (81, 82, 90):
            flags = np.zeros(width, dtype=bool)
            flags[sorted(violations(decode_solution(toks[:width]), puzzles[r]))] = True
            if strict:
                flags[:81] |= ~np.isin(toks[:81], DIGIT_IDS)
                if width > 81:
                    flags[81] |= toks[81] != EOS
            assert (check(r, toks[:width]) == flags).all(), (trial, width)
        rows.append(r), canvases.append(toks[:90]), expected.append(flags)
    assert (check.many(np.array(rows), np.stack(canvases)) == np.stack(expected)).all()
    assert np.stack(expected).any(axis=1).mean() > 0.5  # most canvases break something: the test has teeth


# -- the training forward is the inference forward ------------------------------------------------------------------

def test_training_forward_matches_inference(config, pairs):
    model = new_model(config, seed=3)
    prompts, targets = batch(pairs, 4)
    valid = torch.ones_like(prompts, dtype=torch.bool)
    valid[1, :5] = False  # one left-padded row
    canvas = torch.randint(0, VOCAB_SIZE, targets.shape, generator=torch.Generator().manual_seed(0))
    sc = torch.softmax(torch.randn(*targets.shape, VOCAB_SIZE, generator=torch.Generator().manual_seed(1)), -1)
    with torch.no_grad():
        ref_state = model.encode(prompts, valid, None)
        ref = [model.decode(canvas, ref_state, None), model.decode(canvas, ref_state, sc)]
    state, hidden = encode_train(model, prompts, valid)
    assert state.keys[0].requires_grad and hidden.shape == (4, PROMPT_LENGTH, TINY["hidden_size"])  # the cache has gradients
    assert state.length == ref_state.length and state.has_padding == ref_state.has_padding
    for a, b in zip(state.keys + state.values, ref_state.keys + ref_state.values):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-6)
    got = [decode_train(model, canvas, state, None), decode_train(model, canvas, state, sc)]
    for g, r in zip(got, ref):
        assert g.dtype == torch.float32 and g.shape == (4, CANVAS_LENGTH, VOCAB_SIZE)
        torch.testing.assert_close(g.detach(), r, rtol=0, atol=1e-5)
    assert (ref[0] - ref[1]).abs().max() > 1e-3  # self-conditioning matters, so the comparison above can fail
    # The encoder may also see the clean target (causal): the prompt's cache is unchanged.
    both = torch.cat([valid, torch.ones_like(targets).bool()], 1)
    full, _ = encode_train(model, torch.cat([prompts, targets], 1), both, cache_length=prompts.shape[1])
    for a, b in zip(full.keys + full.values, ref_state.keys + ref_state.values):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-5)


def test_zero_self_conditioning_rows_equal_no_self_conditioning(config, pairs):
    model = new_model(config, seed=4)
    prompts, targets = batch(pairs, 2)
    with torch.no_grad():
        state = model.encode(prompts, torch.ones_like(prompts, dtype=torch.bool), None)
        torch.testing.assert_close(model.decode(targets, state, torch.zeros(2, CANVAS_LENGTH, VOCAB_SIZE)),
                                   model.decode(targets, state, None), rtol=0, atol=0)


def test_objective_is_the_documented_one(config, pairs):
    """Rebuild the loss by hand: corruption with probability t, encoder next-token CE over the prompt, decoder CE over
    the canvas, the second pass fed the first pass's softmax on self-conditioned rows."""
    import torch.nn.functional as F

    from dgemma.backends.cuda.train import corrupt, logits_train

    model = new_model(config, seed=6)
    prompts, targets = batch(pairs, 3)
    t = torch.tensor([0.0, 0.5, 1.0])
    noisy, replaced = corrupt(targets, t, VOCAB_SIZE, torch.Generator().manual_seed(5))
    assert torch.equal(noisy[0], targets[0]) and not replaced[0].any() and replaced[2].all()
    cfg = TrainConfig()
    with torch.no_grad():
        state, hidden = encode_train(model, prompts)
        enc = F.cross_entropy(logits_train(model, hidden[:, :-1]).reshape(-1, VOCAB_SIZE), prompts[:, 1:].reshape(-1))
        plain = decode_train(model, noisy, state, None)
        selfcond = decode_train(model, noisy, state, torch.softmax(plain, -1))
        for mask, logits in ((torch.zeros(3, dtype=torch.bool), plain), (torch.ones(3, dtype=torch.bool), selfcond)):
            want = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1)) + enc
            gen = torch.Generator().manual_seed(5)
            got, parts = diffusion_loss(model, prompts, targets, cfg, gen, t=t, sc_mask=mask)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            assert parts["noise"] == pytest.approx(float(replaced.float().mean()))
    assert (plain - selfcond).abs().max() > 1e-3


@pytest.mark.slow
def test_loss_goes_down_on_a_fixed_batch(config, pairs):
    torch.manual_seed(0)
    model = new_model(config, seed=0)
    tr = Trainer(model, TrainConfig(lr=3e-3, batch=8, seed=0))
    prompts, targets = batch(pairs, 8)
    before = tr.eval_loss(prompts, targets)
    dec_before = diffusion_loss(model, prompts, targets, tr.cfg, torch.Generator().manual_seed(9))[1]["decoder"]
    for _ in range(30):
        tr.train_step(prompts, targets)
    after = tr.eval_loss(prompts, targets)
    dec_after = diffusion_loss(model, prompts, targets, tr.cfg, torch.Generator().manual_seed(9))[1]["decoder"]
    assert after < 0.5 * before, (before, after)
    assert dec_after < 0.8 * dec_before, (dec_before, dec_after)
    assert tr.step == 30 and len(tr.history) == 30


# -- LoRA --------------------------------------------------------------------------------------------------------------

def _logits(model, prompts, targets):
    with torch.no_grad():
        state = model.encode(prompts, torch.ones_like(prompts, dtype=torch.bool), None)
        return model.decode(targets, state, None)


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def test_lora_save_load_merge(config, pairs, tmp_path):
    prompts, targets = batch(pairs, 2)
    model = new_model(config, seed=1)
    base = _logits(model, prompts, targets)
    wrapped = apply_lora(model, rank=4, alpha=8.0, seed=0)
    assert any(n.endswith("q_proj") for n in wrapped) and any(n.startswith("self_conditioning.") for n in wrapped)
    assert not any(n.endswith("v_proj") and n.startswith("layers.1.") for n in wrapped)  # full layer: no v_proj
    torch.testing.assert_close(_logits(model, prompts, targets), base, rtol=0, atol=0)  # B = 0 at init
    _randomize_lora(model)
    lora = _logits(model, prompts, targets)
    assert (lora - base).abs().max() > 1e-3
    for path in (tmp_path / "a.safetensors", tmp_path / "adapter"):
        save_lora(model, path)
        fresh = new_model(config, seed=1)
        load_lora(fresh, path)
        assert torch.equal(_logits(fresh, prompts, targets), lora)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    with pytest.raises(ValueError, match="do not match"):  # adapters of another shape are refused
        load_lora(_wrapped(config, rank=2, targets=("q_proj",)), tmp_path / "a.safetensors")
    merge_lora(model)
    assert not lora_modules(model)
    merged = _logits(model, prompts, targets)
    # Folding B A into W changes float32 rounding only: 1e-5 of the logits' scale (soft-capped at 30).
    assert (merged - lora).abs().max() <= 1e-5 * lora.abs().max(), (merged - lora).abs().max()
    assert (merged - base).abs().max() > 1e-3


def _wrapped(config, rank, targets):
    m = new_model(config, seed=1)
    apply_lora(m, rank=rank, alpha=8.0, targets=targets)
    return m


def test_lora_training_touches_only_adapters_and_exports_merged(config, pairs, tmp_path):
    prompts, targets = batch(pairs, 4)
    model = new_model(config, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = Trainer(model, TrainConfig(lr=1e-2, batch=4, lora_rank=4, lora_alpha=8.0))
    for _ in range(3):
        tr.train_step(prompts, targets)
    after = model.state_dict()
    changed = {k for k in after if ".lora_" not in k and not torch.equal(after[k], before[k.replace(".base.", ".")])}
    assert not changed
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in after.items() if k.endswith("lora_B"))
    want = _logits(model, prompts, targets)
    export_hf(model, tmp_path / "m", config, sudoku_generation_config(), write_tokenizer)
    loaded = dgemma.load(tmp_path / "m", backend="cuda", device="cpu")
    got = _logits(loaded.backend.model, prompts, targets)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(got, _logits(merge_lora(model), prompts, targets))  # export == merge, bit for bit


# -- the example script, end to end, and resuming --------------------------------------------------------------------

def _script():
    spec = importlib.util.spec_from_file_location("sudoku_train_example", ROOT / "examples" / "sudoku" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ARGS = ["--batch", "4", "--difficulty", "easy", "--pool", "16", "--eval-size", "4", "--eval-every", "2", "--save-every", "2",
        "--hidden", "32", "--layers", "2", "--no-progress", "--device", "cpu", "--lr", "3e-3", "--warmup", "0"]


@pytest.mark.slow
def test_example_script_end_to_end_and_resume(tmp_path, capsys):
    script = _script()
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert script.main(["--out", str(straight), "--steps", "4", "--solve-eval", "1"] + ARGS) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 4 and 0.0 <= result["cell_acc"] <= 1.0
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "train_state.pt"):
        assert (straight / f).exists(), f
    from safetensors import safe_open
    with safe_open(str(straight / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.decoder.layers.0.self_attn.q_proj.weight" in names
    assert "model.encoder.language_model.layers.1.layer_scalar" in names
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and "eval/easy_solved" in log[-1]

    model = dgemma.load(straight, backend="cuda", device="cpu")
    puzzle, _ = generate_dataset(1, "easy", seed=77)[0]
    assert model.tokenizer.encode(puzzle) == encode_prompt(puzzle)
    gen = model.generate(puzzle, seed=0, checker=make_checker([puzzle]), max_retries=1, max_denoising_steps=4)
    assert gen.stats.canvases == 1 and len(gen.raw_token_ids) == CANVAS_LENGTH
    assert len(decode_solution(gen.token_ids)) == 81
    is_valid_solution(puzzle, decode_solution(gen.token_ids))  # a tiny model need not solve it; it must score

    # Resume: 2 steps, then 2 more from train_state.pt, equals 4 straight steps bit for bit.
    assert script.main(["--out", str(resumed), "--steps", "2"] + ARGS) == 0
    assert torch.load(resumed / "train_state.pt", weights_only=False)["step"] == 2
    assert script.main(["--out", str(resumed), "--steps", "4", "--resume"] + ARGS) == 0
    state = torch.load(resumed / "train_state.pt", weights_only=False)
    assert state["step"] == 4 and [h["step"] for h in state["history"]] == [1, 2, 3, 4]
    with safe_open(str(straight / "model.safetensors"), "pt") as a, \
            safe_open(str(resumed / "model.safetensors"), "pt") as b:
        for name in names:
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
    # Resuming with a different LoRA setting is refused rather than silently mis-loaded.
    with pytest.raises(ValueError, match="lora_rank"):
        script.main(["--out", str(resumed), "--steps", "5", "--resume", "--lora-rank", "2"] + ARGS)


def test_example_script_mix_parses_and_rejects_bad_weights(tmp_path, capsys):
    """--mix "E,M,H:E,M,H": the curriculum's start and end weights, normalised; a malformed value is a one-line usage
    error before any output folder is made."""
    script = _script()
    start, end = script.parse_mix("2,2,0:1,1,2")
    assert np.allclose(start, [0.5, 0.5, 0.0]) and np.allclose(end, [0.25, 0.25, 0.5])
    for bad in ("1,2", "1,2,3", "a,b,c:1,1,1", "0,0,0:1,1,1", "1,-1,1:1,1,1"):
        with pytest.raises(ValueError, match="weight lists"):
            script.parse_mix(bad)
    with pytest.raises(SystemExit):
        script.main(["--out", str(tmp_path / "never"), "--mix", "1,2"] + ARGS)
    assert "--mix '1,2': expected two" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
