"""Streaming safetensors writer: each shard's header is written first from the plan (names, dtypes, shapes are known
before any weight is read), then tensor data goes to its final offset chunk by chunk, so no shard is ever assembled
in memory."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .plan import OutTensor

INDEX = "model.safetensors.index.json"


def write_at(fd: int, data, offset: int) -> None:
    """The one place bytes reach the disk (tests monkeypatch it to simulate a full disk)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


@dataclass
class Shard:
    file: str
    tensors: list[OutTensor] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=dict)   # absolute file offset of each tensor's data
    nbytes: int = 0
    header: bytes = b""


def assign_shards(groups: list[list[OutTensor]], max_bytes: int) -> list[Shard]:
    """Greedy in processing order; the outputs of one source tensor stay in one shard."""
    shards: list[Shard] = []
    cur = Shard("")
    for g in groups:
        size = sum(t.nbytes for t in g)
        if cur.tensors and cur.nbytes + size > max_bytes:
            shards.append(cur)
            cur = Shard("")
        cur.tensors.extend(g)
        cur.nbytes += size
    if cur.tensors or not shards:
        shards.append(cur)
    n = len(shards)
    for i, s in enumerate(shards):
        s.file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        pos = 0
        for t in s.tensors:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
            pos += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        s.header = len(raw).to_bytes(8, "little") + raw
        base = len(s.header)
        pos = 0
        for t in s.tensors:
            s.offsets[t.name] = base + pos
            pos += t.nbytes
    return shards


class ShardWriter:
    def __init__(self, folder: Path, shards: list[Shard], fsync: bool = True):
        self.folder = folder
        self.shards = shards
        self.fsync = fsync
        self.where: dict[str, tuple[Shard, OutTensor]] = {t.name: (s, t) for s in shards for t in s.tensors}
        self.written: dict[str, int] = {}
        self._fds: dict[str, int] = {}
        self.closed: set[str] = set()
        self.unfinished: dict[str, int] = {s.file: len(s.tensors) for s in shards}  # a shard closes at 0
        self.bytes = 0

    def _fd(self, shard: Shard) -> int:
        fd = self._fds.get(shard.file)
        if shard.file in self.closed:
            raise AssertionError(f"{shard.file} written after it was complete")
        if fd is None:
            path = self.folder / shard.file
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[shard.file] = fd
            write_at(fd, shard.header, 0)
        return fd

    def write(self, name: str, byte_offset: int, data) -> None:
        """`data` (bytes-like) lands at `byte_offset` within tensor `name`."""
        shard, t = self.where[name]
        mv = memoryview(data).cast("B")
        if byte_offset + mv.nbytes > t.nbytes:
            raise AssertionError(f"write past the end of {name}")  # a planning bug, not user input
        write_at(self._fd(shard), mv, shard.offsets[name] + byte_offset)
        self.written[name] = self.written.get(name, 0) + mv.nbytes
        self.bytes += mv.nbytes

    def finish_tensor(self, name: str) -> None:
        """Called once per tensor when all its bytes are written (a shard of per-expert linears holds thousands)."""
        shard, t = self.where[name]
        if self.written.get(name, 0) != t.nbytes:
            raise AssertionError(f"{name}: wrote {self.written.get(name, 0)} of {t.nbytes} bytes")
        self.unfinished[shard.file] -= 1
        if self.unfinished[shard.file] == 0:
            self._close(shard)

    def _close(self, shard: Shard) -> None:
        if shard.file not in self._fds:  # only empty tensors: the header alone
            self._fd(shard)
        fd = self._fds.pop(shard.file)
        self.closed.add(shard.file)
        try:
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def close_all(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def write_index(self, metadata: dict | None = None) -> None:
        if len(self.closed) != len(self.shards):
            raise AssertionError("index written before every shard was complete")
        total = sum(s.nbytes for s in self.shards)
        index = {"metadata": {"total_size": total, **(metadata or {})},
                 "weight_map": {t.name: s.file for s in self.shards for t in s.tensors}}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
