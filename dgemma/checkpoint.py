"""Reading checkpoints in the Hugging Face layout: a local folder or a hub id resolved through huggingface_hub.

The core never materialises tensors itself: it finds the files, checks that every shard the index names is there and
readable, and hands each backend a `safe_open` on the framework it wants (safetensors imports that framework lazily).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .config import ModelConfig, SamplerSettings, read_json
from .errors import CheckpointError, ConfigError

WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
# Files a checkpoint needs besides the weights; the rest of a hub repo (README, images) is not fetched.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (or found in the local cache when offline)."""
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p}: expected a model folder, got a file")
        return p
    text = str(model)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~")) and " " not in text
    if not looks_like_repo:
        raise CheckpointError(f"{text}: no such model folder (and not a hub id of the form 'org/name')")
    return _from_hub(text, lambda hub, local_only: hub.snapshot_download(
        repo_id=text, allow_patterns=HUB_PATTERNS, local_files_only=local_only))


def hub_file(repo_id: str, filename: str) -> Path:
    """One file of a hub repo (e.g. its config.json), from the local cache when offline; errors as for a model."""
    return _from_hub(repo_id, lambda hub, local_only: hub.hf_hub_download(
        repo_id=repo_id, filename=filename, local_files_only=local_only))


@functools.lru_cache(maxsize=1)
def hub_offline() -> bool:
    """Whether to use the local Hugging Face cache only: HF_HUB_OFFLINE is set, or the hub's host cannot be reached
    (one connection attempt of a few seconds at most, so an offline machine fails at once instead of after
    huggingface_hub's retries). Behind a proxy the proxy decides, so the hub is then taken as reachable."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError:
        return True
    return False


def _from_hub(text: str, fetch) -> Path:
    try:
        import huggingface_hub as hub
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - a dependency of the package
        raise CheckpointError("huggingface_hub is not installed: pip install huggingface_hub") from None
    try:
        return Path(fetch(hub, hub_offline()))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{text}: not in the local Hugging Face cache and the hub cannot be reached (offline); "
            f"download it once with `hf download {text}` or pass a local folder"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{text}: no such model on the hub (or it is gated: log in with `hf auth login`)") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{text}: could not fetch from the hub ({type(e).__name__}: {e})") from None


def _safetensors_header(path: Path) -> dict:
    """Read and check a shard's header without loading tensors (catches truncated/corrupt files up front)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file is shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or 8 + n > size:
                raise ValueError("header length is out of range")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"truncated: tensors need {8 + n + end} bytes, file has {size}")
        return header
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard is missing") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None


@dataclass
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


class Checkpoint:
    """A checkpoint folder: configs, tokenizer files and a name -> shard map of its tensors."""

    def __init__(self, path: str | os.PathLike, *, check_shards: bool = True):
        self.path = resolve_model_path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.exists():
            raise CheckpointError(f"{self.path}: no config.json (is this a model folder?)")
        self.raw_config = read_json(cfg_path)
        self.config = ModelConfig.from_dict(self.raw_config, source=str(cfg_path))
        gen_path = self.path / "generation_config.json"
        self.raw_generation_config = read_json(gen_path) if gen_path.exists() else {}
        try:
            self.sampler_defaults = SamplerSettings.from_generation_config(self.raw_generation_config, self.config)
        except ConfigError as e:
            raise ConfigError(f"{gen_path}: {e}") from None
        self.tensors: dict[str, TensorInfo] = {}
        self._index_files()
        if check_shards:
            self._read_headers()

    # -- weights -------------------------------------------------------------------------------------------------
    def _index_files(self) -> None:
        index = self.path / WEIGHTS_INDEX
        single = self.path / SINGLE_WEIGHTS
        if index.exists():
            data = read_json(index)
            wmap = data.get("weight_map")
            if not isinstance(wmap, dict) or not wmap:
                raise CheckpointError(f"{index}: has no weight_map")
            self._weight_map = {k: self.path / v for k, v in wmap.items()}
            for shard in sorted(set(self._weight_map.values())):
                if not shard.exists():
                    raise CheckpointError(f"{shard}: shard is missing (named in {WEIGHTS_INDEX})")
        elif single.exists():
            self._weight_map = None
        else:
            shards = sorted(self.path.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{self.path}: no model.safetensors or {WEIGHTS_INDEX}")
            self._weight_map = None
        self.files = sorted(set(self._weight_map.values())) if self._weight_map else (
            [single] if single.exists() else sorted(self.path.glob("*.safetensors"))
        )

    def _read_headers(self) -> None:
        for f in self.files:
            header = _safetensors_header(f)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if self._weight_map is not None and self._weight_map.get(name) not in (None, f):
                    continue
                self.tensors[name] = TensorInfo(f, meta["dtype"], tuple(meta["shape"]))
        if self._weight_map is not None:
            missing = [k for k in self._weight_map if k not in self.tensors]
            if missing:
                raise CheckpointError(
                    f"{self._weight_map[missing[0]]}: does not hold tensor {missing[0]!r} that {WEIGHTS_INDEX} names"
                )

    def iter_tensors(self, framework: str, names: set[str] | None = None) -> Iterator[tuple[str, object]]:
        """Yield (name, tensor) one at a time from memory-mapped shards, in file order."""
        try:
            from safetensors import safe_open
        except ImportError:  # pragma: no cover
            raise CheckpointError("safetensors is not installed: pip install safetensors") from None
        by_file: dict[Path, list[str]] = {}
        for name, info in self.tensors.items():
            if names is None or name in names:
                by_file.setdefault(info.file, []).append(name)
        for f, keys in by_file.items():
            try:
                with safe_open(str(f), framework=framework) as handle:
                    for k in keys:
                        yield k, handle.get_tensor(k)
            except (OSError, RuntimeError, ValueError) as e:  # safetensors raises SafetensorError (a RuntimeError)
                raise CheckpointError(f"{f}: could not read tensor data ({e})") from None

    # -- tokenizer -----------------------------------------------------------------------------------------------
    def require_tokenizer(self) -> None:
        """CheckpointError naming the folder when it has no tokenizer.json (text prompts need one)."""
        if not (self.path / "tokenizer.json").exists():
            raise CheckpointError(f"{self.path}: this model folder has no tokenizer.json, so a text prompt cannot be "
                                  "encoded (copy in the tokenizer.json of the model it came from, or pass token ids "
                                  "from Python)")

    def tokenizer(self):
        from .tokenizer import Tokenizer

        return Tokenizer.from_folder(self.path)
