"""The MLX fine-tuning recipe (backends/mlx/train.py) against the PyTorch one (backends/cuda/train.py), on tiny models:
the same objective and gradients on the same weights and noise, adapters and exported checkpoints that load in either
backend, and resumable training."""

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import dgemma  # noqa: E402
from dgemma.backends.cuda import train as torch_train  # noqa: E402
from dgemma.backends.mlx import train as mlx_train  # noqa: E402
from dgemma.sudoku import generate_dataset  # noqa: E402
from dgemma.sudoku_task import (CANVAS_LENGTH, PROMPT_LENGTH, VOCAB_SIZE, encode_batch,  # noqa: E402
                                sudoku_generation_config, sudoku_model_config, write_tokenizer)

TINY = dict(hidden_size=32, num_hidden_layers=2, num_experts=4, top_k_experts=2, moe_intermediate_size=16,
            intermediate_size=64, num_attention_heads=2, head_dim=16)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The PyTorch side runs tiny models, which gain nothing from threads; on a busy 2-core machine its OpenMP
    workers wait on each other (measured: a tiny training step took 5 s with 2 threads, 0.1 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs():
    return generate_dataset(12, "easy", seed=5)


@pytest.fixture(scope="module")
def config():
    return sudoku_model_config(**TINY)


def batch(pairs, n=4):
    return encode_batch(pairs[:n])


def mlx_logits(model, prompts, canvas):
    state = model.encode(mx.array(prompts.astype(np.int32)), np.ones(prompts.shape, dtype=bool), None)
    return np.array(model.decode(mx.array(canvas.astype(np.int32)), state))


def torch_logits(model, prompts, canvas):
    with torch.no_grad():
        p = torch.tensor(prompts)
        state = model.encode(p, torch.ones_like(p, dtype=torch.bool), None)
        return model.decode(torch.tensor(canvas), state).numpy()


def assert_close(got, want, rel):
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= rel, err


# -- the objective equals the PyTorch one ------------------------------------------------------------------------------

@pytest.mark.parametrize("encoder_loss_weight,encoder_sees_target,padded", [
    (1.0, False, True),   # a left-padded prompt row: masks in encoder, encoder loss and decoder
    (0.0, False, False),  # the encoder is reached only through the cache the decoder reads
    (0.5, True, False),   # encoder next-token loss over prompt + clean target
])
def test_loss_and_gradients_equal_torch(config, pairs, encoder_loss_weight, encoder_sees_target, padded):
    prompts, targets = batch(pairs, 4)
    kw = dict(encoder_loss_weight=encoder_loss_weight, encoder_sees_target=encoder_sees_target)
    t = np.array([0.1, 0.5, 0.9, 0.3], dtype=np.float32)
    sc_mask = np.array([True, False, True, True])
    valid = np.ones(prompts.shape, dtype=bool)
    if padded:
        valid[1, :7] = False
    noisy, _ = torch_train.corrupt(torch.tensor(targets), torch.tensor(t), VOCAB_SIZE, torch.Generator().manual_seed(7))

    tm = torch_train.new_model(config, seed=3)
    want, want_parts = torch_train.diffusion_loss(
        tm, torch.tensor(prompts), torch.tensor(targets), torch_train.TrainConfig(**kw),
        torch.Generator().manual_seed(7), prompt_valid=torch.tensor(valid), t=torch.tensor(t),
        sc_mask=torch.tensor(sc_mask))
    want.backward()

    mm = mlx_train.new_model(config, seed=3)
    cfg = mlx_train.TrainConfig(**kw)
    got, parts = mlx_train.diffusion_loss(mm, prompts, targets, cfg, prompt_valid=valid, t=t, sc_mask=sc_mask,
                                          noisy=noisy.numpy())
    for k in ("loss", "decoder", "encoder", "canvas_acc"):
        assert parts[k] == pytest.approx(want_parts[k], rel=1e-4, abs=1e-6), k
    # Self-conditioning is part of what is compared: without it the loss is another number.
    plain, _ = mlx_train.diffusion_loss(mm, prompts, targets, cfg, prompt_valid=valid, t=t,
                                        sc_mask=np.zeros(4, dtype=bool), noisy=noisy.numpy())
    assert abs(float(plain) - parts["loss"]) > 1e-3

    mlx_train.Trainer(mm, cfg)  # sets what full fine-tuning trains: every parameter but the layer scalars
    loss_and_grad = nn.value_and_grad(mm, lambda *a: mlx_train.diffusion_objective(mm, *a, cfg, prompt_valid=valid))
    (loss, _), grads = loss_and_grad(prompts, targets, noisy.numpy(), sc_mask)
    grads = dict(tree_flatten(grads))
    assert float(loss) == pytest.approx(parts["loss"], rel=1e-6)
    compared = 0
    for name, p in tm.named_parameters():
        g = grads[name if name in grads else name + ".weight"]  # MLX's packed experts are SwitchLinear weights
        assert_close(np.array(g), p.grad.numpy(), 1e-3)
        compared += 1
    assert compared == len(grads)  # every trainable MLX parameter has its PyTorch counterpart


def test_training_steps_equal_torch(config, pairs, monkeypatch):
    """The same AdamW steps as the PyTorch Trainer (bias correction, decoupled weight decay, gradient clipping, the
    warmup/cosine schedule) on the same weights and noise: PyTorch's corruption is replaced by the canvas the MLX
    step draws, and self-conditioning probability 1 makes both sides' coins agree."""
    prompts, targets = batch(pairs, 4)
    kw = dict(lr=1e-2, weight_decay=0.1, grad_clip=0.5, self_conditioning_p=1.0, warmup_steps=1, decay_steps=2)
    mt = mlx_train.Trainer(mlx_train.new_model(config, seed=4), mlx_train.TrainConfig(**kw))
    tt = torch_train.Trainer(torch_train.new_model(config, seed=4), torch_train.TrainConfig(**kw))
    start = {n: p.detach().clone() for n, p in tt.model.named_parameters()}
    canvas = {}
    monkeypatch.setattr(torch_train, "corrupt", lambda tg, t, v, gen=None: (canvas["noisy"], canvas["noisy"] != tg))
    for step in range(3):
        _, sc_mask, noisy, _ = mlx_train.draw_noise(targets, mt.cfg, VOCAB_SIZE, np.random.default_rng(100 + step))
        assert sc_mask.all()
        canvas["noisy"] = torch.tensor(noisy)
        got = mt.train_step(prompts, targets, rng=np.random.default_rng(100 + step))
        want = tt.train_step(prompts, targets)
        for k in ("loss", "decoder", "encoder", "grad_norm", "lr"):
            assert got[k] == pytest.approx(want[k], rel=1e-3), (step, k)
    assert want["grad_norm"] > kw["grad_clip"]  # clipping was active
    params = dict(tree_flatten(mt.model.parameters()))
    moved_mlx, moved_torch = [], []
    for n, p in tt.model.named_parameters():
        moved_torch.append((p.detach() - start[n]).numpy().ravel())
        moved_mlx.append(np.array(params[n if n in params else n + ".weight"]).ravel() - start[n].numpy().ravel())
    moved_mlx, moved_torch = np.concatenate(moved_mlx), np.concatenate(moved_torch)
    # Adam moves every weight by about lr whatever its gradient's size, so a weight whose gradient is within rounding
    # of zero may move either way on either side: compare the update as a whole.
    assert np.linalg.norm(moved_mlx - moved_torch) <= 1e-2 * np.linalg.norm(moved_torch)


@pytest.mark.slow
def test_train_steps_lower_the_loss(config, pairs):
    prompts, targets = batch(pairs, 4)
    model = mlx_train.new_model(config, seed=0)
    tr = mlx_train.Trainer(model, mlx_train.TrainConfig(lr=1e-2, batch=4, seed=0))
    before = tr.eval_loss(prompts, targets)
    frozen = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if k.endswith("layer_scalar")}
    for _ in range(8):
        parts = tr.train_step(prompts, targets)
    after = tr.eval_loss(prompts, targets)
    assert after < 0.7 * before, (before, after)
    assert tr.step == 8 and len(tr.history) == 8 and parts["grad_norm"] > 0
    # The layer scalars are buffers in the reference: full fine-tuning leaves them alone.
    for k, v in tree_flatten(model.parameters()):
        if k in frozen:
            assert np.array_equal(np.array(v), frozen[k]), k


# -- LoRA: one file format for both backends ---------------------------------------------------------------------------

def _randomize_torch_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in torch_train.lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def _randomize_mlx_lora(model, seed=0):
    rng = np.random.default_rng(seed)
    for m in mlx_train.lora_modules(model).values():
        m.lora_B = mx.array((rng.standard_normal(m.lora_B.shape) * 0.05).astype(np.float32))


@pytest.mark.parametrize("form", ["a.safetensors", "adapter"])
def test_lora_adapters_load_across_backends(config, pairs, tmp_path, form):
    prompts, targets = batch(pairs, 2)
    base = mlx_logits(mlx_train.new_model(config, seed=1), prompts, targets)

    # PyTorch -> MLX
    tm = torch_train.new_model(config, seed=1)
    torch_train.apply_lora(tm, rank=4, alpha=8.0, seed=0)
    _randomize_torch_lora(tm)
    want = torch_logits(tm, prompts, targets)
    torch_train.save_lora(tm, tmp_path / "torch" / form)
    mm = mlx_train.load_lora(mlx_train.new_model(config, seed=1), tmp_path / "torch" / form)
    assert set(mlx_train.lora_modules(mm)) == set(torch_train.lora_modules(tm))
    got = mlx_logits(mm, prompts, targets)
    assert_close(got, want, 1e-4)
    assert np.abs(got - base).max() > 1e-3  # the adapters change the logits, so the comparison can fail

    # MLX -> PyTorch
    mm = mlx_train.new_model(config, seed=1)
    wrapped = mlx_train.apply_lora(mm, rank=4, alpha=8.0, seed=0)
    assert any(n.endswith("q_proj") for n in wrapped) and any(n.startswith("self_conditioning.") for n in wrapped)
    assert not any(n.startswith("layers.1.") and n.endswith("v_proj") for n in wrapped)  # full layer: no v_proj
    assert np.array_equal(mlx_logits(mm, prompts, targets), base)  # B = 0 at init
    _randomize_mlx_lora(mm)
    want = mlx_logits(mm, prompts, targets)
    mlx_train.save_lora(mm, tmp_path / "mlx" / form)
    tm = torch_train.load_lora(torch_train.new_model(config, seed=1), tmp_path / "mlx" / form)
    assert_close(torch_logits(tm, prompts, targets), want, 1e-4)

    other = mlx_train.new_model(config, seed=1)
    mlx_train.apply_lora(other, rank=2, alpha=8.0, targets=("q_proj",))
    with pytest.raises(ValueError, match="do not match"):  # adapters of another shape are refused
        mlx_train.load_lora(other, tmp_path / "mlx" / form)


def test_lora_saved_names_and_config_are_peft(config, tmp_path):
    from safetensors import safe_open

    mm = mlx_train.new_model(config, seed=1)
    mlx_train.apply_lora(mm, rank=4, alpha=8.0, seed=0)
    mlx_train.save_lora(mm, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "np") as f:
        names = set(f.keys())
        meta = json.loads(f.metadata()["adapter_config"])
    assert "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert meta["r"] == 4 and meta["lora_alpha"] == 8.0 and "q_proj" in meta["target_modules"]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()) == meta


def test_merge_lora_equals_unmerged_adapters(config, pairs):
    prompts, targets = batch(pairs, 2)
    mm = mlx_train.new_model(config, seed=1)
    base = mlx_logits(mm, prompts, targets)
    mlx_train.apply_lora(mm, rank=4, alpha=8.0, seed=0)
    _randomize_mlx_lora(mm)
    lora = mlx_logits(mm, prompts, targets)
    mlx_train.merge_lora(mm)
    assert not mlx_train.lora_modules(mm)
    assert not any(".lora_" in k or ".base." in k for k, _ in tree_flatten(mm.parameters()))
    merged = mlx_logits(mm, prompts, targets)
    # Folding B A into W changes float32 rounding only: 1e-5 of the logits' scale (soft-capped at 30).
    assert_close(merged, lora, 1e-5)
    assert np.abs(merged - base).max() > 1e-3


# -- resumable training ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lora_rank", [0, 4])
@pytest.mark.slow
def test_resumed_training_equals_an_unbroken_run(config, pairs, tmp_path, lora_rank):
    prompts, targets = encode_batch(pairs)
    cfg = dict(lr=5e-3, batch=2, seed=3, warmup_steps=1, decay_steps=3, weight_decay=0.01, lora_rank=lora_rank,
               lora_alpha=8.0)
    seen = {"straight": [], "resumed": []}

    def batches(run):
        def batch_fn(step, rng):
            idx = rng.choice(len(prompts), size=2, replace=False)
            seen[run].append((step, tuple(idx)))
            return prompts[idx], targets[idx]
        return batch_fn

    straight = mlx_train.Trainer(mlx_train.new_model(config, seed=0), mlx_train.TrainConfig(**cfg))
    straight.fit(None, None, 4, progress=False, batch_fn=batches("straight"))

    first = mlx_train.Trainer(mlx_train.new_model(config, seed=0), mlx_train.TrainConfig(**cfg, save_every=1))
    saves = []
    first.fit(None, None, 2, checkpoint=str(tmp_path / "state.safetensors"), progress=False,
              batch_fn=batches("resumed"), on_save=lambda tr: saves.append(tr.step))
    assert saves == [1, 2, 2]  # every save_every step, and at the end
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]  # no temp file left behind
    resumed = mlx_train.Trainer(mlx_train.new_model(config, seed=0), mlx_train.TrainConfig(**cfg))
    assert resumed.load(tmp_path / "state.safetensors") == 2
    resumed.fit(None, None, 4, progress=False, batch_fn=batches("resumed"))

    assert seen["resumed"] == seen["straight"]
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    want = dict(tree_flatten(straight.model.parameters()))
    got = dict(tree_flatten(resumed.model.parameters()))
    assert set(got) == set(want)
    for k in want:
        assert np.array_equal(np.array(got[k]), np.array(want[k])), k
    init = {k: np.array(v) for k, v in tree_flatten(mlx_train.new_model(config, seed=0).parameters())}
    changed = {k for k, v in want.items()
               if ".lora_" not in k and not np.array_equal(np.array(v), init[k.replace(".base.", ".")])}
    if lora_rank:  # only the adapters train, and they did
        assert not changed and any(np.abs(np.array(v)).max() > 0 for k, v in want.items() if k.endswith("lora_B"))
    else:  # training changed the weights, so the equality above is not vacuous
        assert changed
    with pytest.raises(ValueError, match="lora_rank"):  # another LoRA setting is refused, not mis-loaded
        mlx_train.Trainer(mlx_train.new_model(config, seed=0),
                          mlx_train.TrainConfig(**dict(cfg, lora_rank=4 - lora_rank))).load(
            tmp_path / "state.safetensors")


# -- export ------------------------------------------------------------------------------------------------------------

def test_export_hf_loads_on_both_backends(config, pairs, tmp_path):
    prompts, targets = batch(pairs, 2)
    mm = mlx_train.new_model(config, seed=2)
    tr = mlx_train.Trainer(mm, mlx_train.TrainConfig(lr=1e-2, lora_rank=4, lora_alpha=8.0))
    for _ in range(2):
        tr.train_step(prompts, targets)
    want = mlx_logits(mm, prompts, targets)
    mlx_train.export_hf(mm, tmp_path / "m", config, sudoku_generation_config(), write_tokenizer)
    assert mlx_train.lora_modules(mm)  # the model keeps its adapters; the export has them merged

    # The same file the PyTorch recipe writes for the same weights: names, shapes and values.
    mlx_train.save_lora(mm, tmp_path / "adapter")
    tm = torch_train.load_lora(torch_train.new_model(config, seed=2), tmp_path / "adapter")
    from safetensors.numpy import load_file
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    theirs = {k: v.numpy() for k, v in torch_train.hf_state_dict(tm).items()}
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == np.float32 and ours[k].shape == theirs[k].shape, k
        np.testing.assert_allclose(ours[k], theirs[k], rtol=0, atol=1e-6, err_msg=k)

    got = {}
    for backend in ("mlx", "cuda"):
        loaded = dgemma.load(tmp_path / "m", backend=backend, device="cpu")
        state = loaded.prefill(prompts)
        got[backend] = np.asarray(loaded.denoise(state, targets))
        assert got[backend].shape == (2, CANVAS_LENGTH, VOCAB_SIZE)
        assert_close(got[backend], want, 1e-4)
    assert_close(got["cuda"], got["mlx"], 1e-4)
    reloaded, raw = mlx_train.load_model(tmp_path / "m")
    assert raw["canvas_length"] == CANVAS_LENGTH and not mlx_train.lora_modules(reloaded)
    assert np.array_equal(mlx_logits(reloaded, prompts, targets), got["mlx"])


def test_one_step_accuracy_scores_the_argmax(config, pairs):
    prompts, targets = batch(pairs, 3)
    tr = mlx_train.Trainer(mlx_train.new_model(config, seed=0), mlx_train.TrainConfig())
    assert prompts.shape[1] == PROMPT_LENGTH
    blanks = np.zeros((3, 81), dtype=bool)
    blanks[:, :40] = True
    res = tr.one_step_accuracy(prompts, targets, blanks=blanks)
    noisy = np.random.default_rng(4321).integers(0, VOCAB_SIZE, targets.shape)
    pred = mlx_logits(tr.model, prompts, noisy).argmax(-1)
    ok = (pred == targets)[:, :81]
    assert res == {"cell_acc": pytest.approx(ok.mean()), "exact": pytest.approx(ok.all(-1).mean()),
                   "blank_acc": pytest.approx(ok[:, :40].mean())}


@pytest.mark.slow
def test_example_script_trains_and_resumes_on_mlx(tmp_path, capsys):
    """`examples/sudoku/train.py --backend mlx`: 2 steps then 2 resumed equal 4 straight; the export loads."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "sudoku" / "train.py"
    spec = importlib.util.spec_from_file_location("sudoku_train_example_mlx", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = ["--backend", "mlx", "--batch", "2", "--difficulty", "easy", "--pool", "8", "--eval-size", "2",
            "--eval-every", "2", "--save-every", "2", "--hidden", "32", "--layers", "2", "--no-progress",
            "--lr", "3e-3", "--warmup", "0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert script.main(["--out", str(straight), "--steps", "4"] + args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4
    assert (straight / "train_state.safetensors").exists() and (straight / "model.safetensors").exists()
    assert script.main(["--out", str(resumed), "--steps", "2"] + args) == 0
    assert script.main(["--out", str(resumed), "--steps", "4", "--resume"] + args) == 0
    from safetensors.numpy import load_file

    want, got = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(want[name], got[name], err_msg=name)
    model = dgemma.load(straight, backend="mlx")
    logits = np.asarray(model.denoise(model.prefill(list(range(2, 30))), [[6] * CANVAS_LENGTH]))
    assert logits.shape == (1, CANVAS_LENGTH, VOCAB_SIZE) and np.isfinite(logits).all()
