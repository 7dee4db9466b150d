"""The layer stack and the two passes over a backend's batch cache, written once for every backend's model class (a mixin).

A model class supplies the framework pieces: `embed(ids)`, `as_activations(x)` (cast given embeddings to the
activations' dtype), `rope(positions, dtype)` taking host int arrays [T] or [k, T], `decoder_input(canvas, soft)`,
`norm`, and `layers` whose items have `sliding`, `self_attn` (`project`, `attend`), the norms, `feed_forward` and the
two layer scalars. Where the new tokens go and what each query sees
comes from `dgemma.kvlayout` through the cache (`dgemma.kvcache.BatchKVCache`).
"""

from __future__ import annotations

import numpy as np

from .kvlayout import decode_layout, extend_layout


def row_positions(starts: np.ndarray, T: int) -> np.ndarray:
    """Positions of T new tokens after each row's `starts`: [T] when the rows agree (one RoPE table for all), else
    [k, T]."""
    if (starts == starts[0]).all():
        return np.arange(int(starts[0]), int(starts[0]) + T)
    return starts[:, None] + np.arange(T)[None, :]


class CachePasses:
    def run_layers(self, x, tables, layer_kv, scalar: str, keys_only_last: bool):
        """The layer stack. `layer_kv(i, k, v) -> (keys, values, mask)` says what layer i's queries attend to (and
        stores the new keys/values where the caller keeps them). With `keys_only_last` the last layer stops after its
        keys and values: the encoder's last output feeds nothing the decoder reads."""
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            cos, sin = tables["sliding" if layer.sliding else "full"]
            q, k, v = attn.project(layer.input_layernorm(x), cos, sin)
            keys, values, mask = layer_kv(i, k, v)
            if i == n - 1 and keys_only_last:
                break
            x = x + layer.post_attention_layernorm(attn.attend(q, keys, values, mask))
            x = layer.feed_forward(x, getattr(layer, scalar))
        return x

    def extend(self, cache, rows: slice, ids, new_valid: np.ndarray, input_embeds=None, image_blocks=None) -> None:
        """Causal encoder pass appending ids [k, T] to rows `rows` of the cache (a prompt chunk or a canvas)."""
        lay = extend_layout(cache.layout, rows, new_valid, image_blocks)
        cache.reserve(ids.shape[1], rows)
        x = self.embed(ids) if input_embeds is None else self.as_activations(input_embeds)
        tables = self.rope(row_positions(lay.full_write, ids.shape[1]), x.dtype)
        masks: dict = {}
        self.run_layers(x, tables, lambda i, k, v: cache.extend_kv(i, rows, lay, k, v, masks),
                        "encoder_layer_scalar", keys_only_last=True)
        cache.finish_extend(rows, lay, new_valid)

    def decode_rows(self, cache, rows: slice, canvas, soft=None, positions: np.ndarray | None = None):
        """Bidirectional decoder over each row's cache and its canvas [k, C]; the final-normed hidden [k, C, H].
        With `positions` [k, A] (fast mode) `canvas` holds only those canvas positions, which alone are forwarded;
        their keys/values overwrite theirs in the canvas slots and the others are read as an earlier pass left
        them."""
        C = self.cfg.canvas_length if positions is not None else canvas.shape[1]
        lay = decode_layout(cache.layout, rows, C)
        cache.reserve(C, rows)
        x = self.decoder_input(canvas, soft)
        masks: dict = {}
        if positions is None:
            tables = self.rope(row_positions(lay.full_write, C), x.dtype)
            layer_kv = lambda i, k, v: cache.decode_kv(i, rows, lay, k, v, masks)  # noqa: E731
        else:
            tables = self.rope(lay.full_write[:, None] + positions, x.dtype)
            layer_kv = lambda i, k, v: cache.decode_kv_at(i, rows, lay, positions, k, v, masks)  # noqa: E731
        x = self.run_layers(x, tables, layer_kv, "layer_scalar", keys_only_last=False)
        return self.norm(x)
