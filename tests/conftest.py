import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


def _cached(ckpt_dir, name, **kw):
    from reference import make_checkpoint

    path = ckpt_dir / name
    if not (path / "config.json").exists():
        make_checkpoint(path, **kw)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(ckpt_dir):
    """6 layers (5 sliding, window 8, and 1 full), canvas 16, float32."""
    return _cached(ckpt_dir, "tiny", canvas_length=16, scale=0.5)


@pytest.fixture(scope="session")
def two_full_ckpt(ckpt_dir):
    """12 layers: two full-attention layers."""
    return _cached(ckpt_dir, "two_full", canvas_length=16, scale=0.5, num_hidden_layers=12, seed=1)


@pytest.fixture(scope="session")
def bf16_ckpt(ckpt_dir):
    import torch

    return _cached(ckpt_dir, "bf16", canvas_length=16, scale=0.5, dtype=torch.bfloat16, seed=2)


@pytest.fixture(scope="session")
def random_default(tmp_path_factory):
    from dgemma.random_model import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("rnd") / "model")
