"""Prompt caching: a request whose prompt starts with an already encoded prefix reuses that prefix's cache.

Entries are snapshots of one row's cache at the prefill chunk boundaries of a prompt (multiples of the backend's
`prefill_chunk`), keyed by a hash of the tokens before the boundary. A prefill always runs in those same chunks, so a
prompt encoded after a cache hit gets exactly the numbers a fresh prefill gets: answers are identical with and without
a hit. Memory is bounded by a byte budget, least recently used entries evicted first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np


def _boundary_keys(tokens: Sequence[int], chunk: int, bounds: Sequence[int] | None = None,
                   embeds=None, blocks=None) -> list[tuple[int, bytes]]:
    """(boundary, key) for every chunk boundary of a prefill: multiples of `chunk` and len(tokens) itself, or the
    `bounds` given (a prefill with images runs a chunk on to the end of an image). With images, a chunk's key also
    covers its image tokens' embeddings, so the same token ids with other pictures never share an entry."""
    h = hashlib.blake2b(digest_size=16)
    arr = np.asarray(tokens, dtype=np.int64)
    if bounds is None:
        bounds = list(range(chunk, len(arr) + 1, chunk))
        if not bounds or bounds[-1] != len(arr):
            bounds.append(len(arr))
    out, a = [], 0
    for b in bounds:
        h.update(arr[a:b].tobytes())
        if embeds is not None and blocks is not None and (np.asarray(blocks[a:b]) > 0).any():
            h.update(np.ascontiguousarray(np.asarray(embeds[a:b], dtype=np.float32)).tobytes())
        out.append((b, h.copy().digest()))
        a = b
    return out


class PromptCache:
    def __init__(self, byte_budget: int, chunk: int = 256):
        if byte_budget <= 0:
            raise ValueError("the prompt cache needs a positive byte budget")
        self.byte_budget, self.chunk = int(byte_budget), int(chunk)
        self.entries: OrderedDict[bytes, tuple[int, object, int]] = OrderedDict()  # key -> (length, cache, bytes)
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def lookup(self, tokens: Sequence[int], bounds=None, embeds=None, blocks=None):
        """(the cached one-row cache of the longest known prefix, its length), or (None, 0)."""
        for b, key in reversed(_boundary_keys(tokens, self.chunk, bounds, embeds, blocks)):
            entry = self.entries.get(key)
            if entry is not None and entry[0] == b:
                self.entries.move_to_end(key)
                self.hits += 1
                return entry[1], b
        self.misses += 1
        return None, 0

    def insert(self, prefix: Sequence[int], cache, bounds=None, embeds=None, blocks=None) -> None:
        """Remember `cache` (one row) as the state after `prefix`; `bounds` are the prefill's chunk ends up to it."""
        key = _boundary_keys(prefix, self.chunk, bounds, embeds, blocks)[-1][1]
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        size = int(cache.nbytes())
        if size > self.byte_budget:
            return
        self.entries[key] = (len(prefix), cache, size)
        self.bytes += size
        while self.bytes > self.byte_budget:
            _, (_, _, freed) = self.entries.popitem(last=False)
            self.bytes -= freed
            self.evictions += 1

    def stats(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.bytes, "byte_budget": self.byte_budget,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
