"""The shipped text model (dgemma/assets/text), its tokenizer, the text recipe (examples/text/train.py on
dgemma.training's text examples) and the quality yardstick (dgemma.quality) on both backends."""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

import dgemma
from dgemma import quality
from dgemma.tokenizer import Tokenizer
from dgemma.training import text_batch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "dgemma" / "assets" / "text"
SPECIAL = dict(bos=2, eos=1, pad=0)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"text_{name}_example", ROOT / "examples" / "text" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_folder(MODEL)


@pytest.fixture(scope="module")
def docs():
    return quality.heldout_documents(MODEL)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small models gain nothing from threads on a busy 2-core machine (see tests/test_train_mlx.py)."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def english_words(text: str, vocabulary: set[str]) -> float:
    """The fraction of a text's words (runs of letters) that are words of the held-out documents."""
    words = re.findall(r"[A-Za-z]+", text)
    return sum(w.lower() in vocabulary for w in words) / max(len(words), 1)


def test_shipped_text_model_declares_its_task_and_is_small():
    config = json.loads((MODEL / "config.json").read_text())
    assert config["dgemma_task"] == "text"
    text = config["text_config"]
    assert config["canvas_length"] >= 64 and text["num_experts"] > 1
    assert {"sliding_attention", "full_attention"} <= set(text["layer_types"])
    assert (MODEL / "model.safetensors").stat().st_size <= 25e6
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "TRAINING.md", "heldout.jsonl"):
        assert (MODEL / name).exists(), name


def test_tokenizer_round_trips_text(tokenizer):
    texts = ["The ", "Return the number of items in a container.\n\nIt raises ValueError if x < 0.",
             "  two spaces, a tab\tand unicode: café, 景太郎, ✓", "def f(x):\n    return {'a': [1, 2]}\n"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids[0] == SPECIAL["bos"] and SPECIAL["eos"] not in ids  # the prompt format: <bos>, then the text
        assert tokenizer.decode(ids) == text
        assert max(ids) < tokenizer.vocab_size
    assert len(tokenizer.encode(texts[1])) < len(texts[1]) / 3  # BPE, not bytes: English takes few tokens


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
@pytest.mark.slow
def test_shipped_model_generates_english_over_several_canvases(backend, docs):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    model = dgemma.load(MODEL, backend=backend)
    canvas = model.config.canvas_length
    gen = model.generate("The ", seed=0, max_new_tokens=2 * canvas, max_denoising_steps=16)
    assert gen.stats.canvases == 2 or gen.stats.finish_reason == "eos"
    assert len(gen.token_ids) > canvas // 2 and gen.text.strip()
    vocabulary = {w.lower() for d in docs for w in re.findall(r"[A-Za-z]+", d)}
    # The model writes words of the documents' English more often than random tokens of its vocabulary do (BPE
    # tokens are often whole words, so random ones score about 0.45).
    rng = np.random.default_rng(0)
    random_score = np.mean([english_words(model.tokenizer.decode(rng.integers(4, model.config.vocab_size,
                                                                              len(gen.token_ids))), vocabulary)
                            for _ in range(8)])
    assert english_words(gen.text, vocabulary) > random_score + 0.1, gen.text


@pytest.mark.slow
def test_recipe_loss_goes_down_on_a_fixed_text_batch(tokenizer, docs):
    torch_train = pytest.importorskip("dgemma.backends.cuda.train")
    train = load_script("train")
    config = train.text_model_config(tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_experts=4,
                                     moe_intermediate_size=16, intermediate_size=64, num_attention_heads=2,
                                     head_dim=16, canvas_length=64)
    prompts, targets, valid = text_batch(tokenizer, docs, np.random.default_rng(1), 8, 48, 64, **SPECIAL)
    assert (~valid).any() or prompts.shape[1] > 1
    tr = torch_train.Trainer(torch_train.new_model(config, seed=0),
                             torch_train.TrainConfig(lr=1e-2, batch=8, seed=0, encoder_loss_weight=0.1))
    before = tr.eval_loss(prompts, targets, prompt_valid=valid)
    for _ in range(10):
        tr.train_step(prompts, targets, prompt_valid=valid)
    after = tr.eval_loss(prompts, targets, prompt_valid=valid)
    assert after < 0.7 * before, (before, after)


@pytest.mark.slow
def test_one_seed_trains_the_same_text_steps_on_both_backends(tokenizer, docs):
    """The noise of a step comes from the core (dgemma.training.noise_rng / draw_noise): two Trainers of the same
    seed take the same steps on PyTorch and MLX, left-padded prompts included."""
    torch_train = pytest.importorskip("dgemma.backends.cuda.train")
    mlx_train = pytest.importorskip("dgemma.backends.mlx.train")
    train = load_script("train")
    config = train.text_model_config(tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_experts=4,
                                     moe_intermediate_size=16, intermediate_size=64, num_attention_heads=2,
                                     head_dim=16, canvas_length=64)
    kw = dict(lr=5e-3, batch=4, seed=11, encoder_loss_weight=0.1)
    tt = torch_train.Trainer(torch_train.new_model(config, seed=2), torch_train.TrainConfig(**kw))
    mt = mlx_train.Trainer(mlx_train.new_model(config, seed=2), mlx_train.TrainConfig(**kw))
    for step in range(2):
        prompts, targets, valid = text_batch(tokenizer, docs, np.random.default_rng(step), 4, 32, 64, **SPECIAL)
        valid[0, :3] = False  # a padded row whatever the draw
        want = tt.train_step(prompts, targets, prompt_valid=valid)
        got = mt.train_step(prompts, targets, prompt_valid=valid)
        for k in ("loss", "decoder", "encoder", "noise", "grad_norm"):
            assert got[k] == pytest.approx(want[k], rel=1e-4), (step, k)


@pytest.mark.slow
def test_yardstick_is_the_same_on_both_backends(docs):
    pytest.importorskip("mlx.core")
    got = {}
    for backend in ("cuda", "mlx"):
        model = dgemma.load(MODEL, backend=backend)
        got[backend] = quality.measure(model, docs, n_loss=8, n_generate=2, max_new_tokens=model.config.canvas_length,
                                       max_denoising_steps=8)
    a, b = got["cuda"], got["mlx"]
    assert list(a.loss) == list(quality.NOISE_LEVELS)
    for t in a.loss:
        assert b.loss[t] == pytest.approx(a.loss[t], rel=1e-5, abs=1e-6), t
        assert b.accuracy[t] == pytest.approx(a.accuracy[t], abs=1 / 8 / 64 + 1e-9), t
    assert b.tokens_per_forward == pytest.approx(a.tokens_per_forward, rel=1e-6)
    assert b.steps_per_canvas == pytest.approx(a.steps_per_canvas, rel=1e-6)
    # The model learned: every noise level's loss is far below a uniform guess's (log of the vocabulary), and the
    # loss grows with the noise.
    assert a.loss[0.25] < a.loss[0.5] < a.loss[0.75] < 0.8 * np.log(4096)
    assert 1.0 <= a.tokens_per_forward and 1 <= a.steps_per_canvas <= 8


def test_yardstick_draws_are_fixed_and_the_loss_is_cross_entropy(docs):
    """The corruption of a level depends only on (level, targets), and the loss is the mean cross-entropy."""
    targets = np.arange(2 * 64).reshape(2, 64) % 50
    a, ra = quality.noisy_canvas(targets, 0.5, 1, 4096)
    b, rb = quality.noisy_canvas(targets, 0.5, 1, 4096)
    assert np.array_equal(a, b) and np.array_equal(ra, rb) and 0.3 < ra.mean() < 0.7
    assert not np.array_equal(quality.noisy_canvas(targets, 0.5, 2, 4096)[0], a)
    logits = np.random.default_rng(0).standard_normal((2, 64, 50)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    want = -np.log(np.take_along_axis(p, targets[..., None], -1)[..., 0])
    np.testing.assert_allclose(quality.cross_entropy(logits, targets), want, rtol=1e-5)
    assert quality.agreement([[1, 2, 3]], [[1, 2, 4, 5]]) == 0.5 and quality.agreement([[7]], [[7]]) == 1.0


@pytest.mark.slow
def test_train_script_trains_resumes_and_exports(tmp_path, capsys):
    """`examples/text/train.py` on a tiny model: 2 steps then 2 resumed equal 4 straight, and the export is a text
    model both backends load."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(MODEL / "tokenizer.json", data / "tokenizer.json")
    lines = (MODEL / quality.HELD_OUT_FILE).read_text().splitlines()
    (data / "corpus.jsonl").write_text("\n".join(lines[:4]) + "\n")
    (data / "heldout.jsonl").write_text("\n".join(lines[4:6]) + "\n")
    train = load_script("train")
    args = ["--data", str(data), "--batch", "2", "--hidden", "32", "--layers", "2", "--experts", "4",
            "--prompt-tokens", "16", "--eval-size", "2", "--eval-every", "2", "--save-every", "2", "--warmup", "1",
            "--threads", "1", "--no-progress"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main(["--out", str(straight), "--steps", "4"] + args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4
    assert train.main(["--out", str(resumed), "--steps", "2"] + args) == 0
    assert train.main(["--out", str(resumed), "--steps", "4", "--resume"] + args) == 0
    from safetensors.numpy import load_file

    want, got = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(want[name], got[name], err_msg=name)
    assert json.loads((straight / "config.json").read_text())["dgemma_task"] == "text"
    assert len(quality.heldout_documents(straight)) == 2
    for backend in ("cuda", "mlx"):
        model = dgemma.load(straight, backend=backend)
        gen = model.generate("The ", seed=0, max_new_tokens=8, max_denoising_steps=2)
        assert gen.stats.decoder_passes >= 1
