"""Core pieces without a framework: config and generation-config reading, checkpoints, tokenizer, chat template,
hub resolution, and the promise that `import dgemma` pulls in neither torch nor mlx."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dgemma.checkpoint import Checkpoint
from dgemma.config import ModelConfig, SamplerSettings
from dgemma.errors import CheckpointError, ConfigError, InputError

REPO = Path(__file__).resolve().parents[1]


def test_import_dgemma_pulls_in_no_framework():
    code = ("import sys, dgemma, dgemma.api, dgemma.cli, dgemma.sampler, dgemma.engine, dgemma.checkpoint; "
            "bad = [m for m in ('torch', 'mlx', 'transformers') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_config_of_saved_checkpoint(tiny_ckpt, two_full_ckpt):
    cfg = Checkpoint(tiny_ckpt).config
    assert cfg.canvas_length == 16 and cfg.sliding_window == 8 and cfg.final_logit_softcapping == 30.0
    full = [s for s in cfg.layers if not s.sliding]
    assert len(full) == 1 and full[0].head_dim == 32 and full[0].num_kv_heads == 1
    assert full[0].rope_type == "proportional" and full[0].partial_rotary_factor == 0.25
    assert cfg.layers[0].head_dim == 16 and cfg.layers[0].num_kv_heads == 2 and cfg.layers[0].rope_theta == 10000.0
    # 10+ layers: save_pretrained zero-pads per_layer_config keys ("05", "11").
    cfg2 = Checkpoint(two_full_ckpt).config
    assert [i for i, s in enumerate(cfg2.layers) if not s.sliding] == [5, 11]
    assert all(s.head_dim == 32 for s in cfg2.layers if not s.sliding)


def test_config_without_per_layer_config_uses_global_keys():
    text = dict(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, head_dim=4, num_experts=2, top_k_experts=1, moe_intermediate_size=4,
                global_head_dim=16, num_global_key_value_heads=1)
    cfg = ModelConfig.from_dict({"model_type": "diffusion_gemma", "text_config": text})
    assert cfg.layers[5].head_dim == 16 and cfg.layers[5].num_kv_heads == 1 and not cfg.layers[5].sliding
    assert cfg.canvas_length == 256 and cfg.layers[5].rope_theta == 1e6


def test_config_errors():
    with pytest.raises(ConfigError, match="model_type is 'gemma3'"):
        ModelConfig.from_dict({"model_type": "gemma3", "text_config": {}})
    with pytest.raises(ConfigError, match=r"config.json: text_config\.\w+ is missing"):
        ModelConfig.from_dict({"model_type": "diffusion_gemma", "text_config": {"num_hidden_layers": 2,
                                                                                 "head_dim": 4}})


def test_generation_config_nulls_fall_back_to_model_defaults(tiny_ckpt):
    """save_pretrained writes unset fields as null; they take the model's documented defaults."""
    gen = json.loads((tiny_ckpt / "generation_config.json").read_text())
    assert gen["max_denoising_steps"] is None and gen["sampler_config"] is None
    s = Checkpoint(tiny_ckpt).sampler_defaults
    assert (s.max_denoising_steps, s.entropy_bound, s.t_min, s.t_max, s.stability_threshold,
            s.confidence_threshold) == (48, 0.1, 0.4, 0.8, 1, 0.005)
    assert s.eos_token_ids == (1,) and s.pad_token_id == 0  # from config.json


def test_generation_config_values_are_the_defaults():
    gen = {"max_denoising_steps": 16, "sampler_config": {"entropy_bound": 0.25, "_cls_name": "EntropyBoundSamplerConfig"},
           "t_min": 0.3, "t_max": 0.9, "stability_threshold": 2, "confidence_threshold": 0.01,
           "eos_token_id": [1, 106, 50], "pad_token_id": 0}
    s = SamplerSettings.from_generation_config(gen)
    assert (s.max_denoising_steps, s.entropy_bound, s.t_min, s.t_max, s.stability_threshold) == (16, 0.25, 0.3, 0.9, 2)
    assert s.eos_token_ids == (1, 106, 50)


@pytest.mark.parametrize("bad, msg", [
    (dict(max_denoising_steps=-1), "max_denoising_steps"), (dict(max_denoising_steps=0), "max_denoising_steps"),
    (dict(t_min=0.9, t_max=0.5), "t_min"), (dict(entropy_bound=0.0), "entropy_bound"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(stability_threshold=-1), "stability_threshold"),
    (dict(confidence_threshold=-0.1), "confidence_threshold"), (dict(temperature=1.0), "unknown sampler"),
])
def test_invalid_sampler_values(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        SamplerSettings().updated(**bad)


def test_sharded_checkpoint_and_bad_shards(tmp_path, tiny_ckpt):
    from reference import load_reference

    sharded = tmp_path / "sharded"
    load_reference(tiny_ckpt).save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 2
    ck = Checkpoint(sharded)
    assert set(ck.tensors) >= set(Checkpoint(tiny_ckpt).tensors) - {"lm_head.weight"}
    # A missing shard is named.
    broken = tmp_path / "missing"
    shutil.copytree(sharded, broken)
    victim = sorted(broken.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: shard is missing"):
        Checkpoint(broken)
    # A truncated (corrupt) shard is named.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(sharded, corrupt)
    victim = sorted(corrupt.glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{victim.name}: not a valid safetensors file"):
        Checkpoint(corrupt)


def test_tokenizer_and_chat_template(random_default):
    tok = Checkpoint(random_default).tokenizer()
    ids = tok.encode("héllo, wörld")
    assert ids[0] == 2 and tok.decode(ids) == "héllo, wörld"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                                    {"role": "user", "content": "Bye"}])
    assert text == ("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    assert tok.encode_chat([{"role": "user", "content": "Hi"}]).count(2) == 1  # bos once, from the template


def test_chat_template_from_tokenizer_config(tmp_path, random_default):
    folder = tmp_path / "m"
    shutil.copytree(random_default, folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template.replace("<start_of_turn>", "<S>")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Checkpoint(folder).tokenizer()
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]).startswith("<bos><S>user")
    cfg.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="no chat template"):
        Checkpoint(folder).tokenizer().apply_chat_template([{"role": "user", "content": "x"}])


def _hub_cache(root: Path, repo: str, source: Path) -> None:
    """Lay out a Hugging Face hub cache entry the way `hf download` leaves it."""
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, snap)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(snap.name)


@pytest.mark.slow
def test_hub_id_resolves_offline_from_the_cache(tmp_path, random_default):
    _hub_cache(tmp_path / "hub", "acme/tiny-diffusiongemma", random_default)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    code = "import dgemma; m = dgemma.load('acme/tiny-diffusiongemma'); print(m.checkpoint.path)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "models--acme--tiny-diffusiongemma/snapshots" in out.stdout
    cli = subprocess.run([sys.executable, "-m", "dgemma.cli", "generate", "--model", "acme/not-downloaded",
                          "--prompt", "hi"], capture_output=True, text=True, env=env)
    assert cli.returncode == 2
    assert cli.stderr.strip().splitlines() == [
        "error: acme/not-downloaded: not in the local Hugging Face cache and the hub cannot be reached (offline); "
        "download it once with `hf download acme/not-downloaded` or pass a local folder"]
