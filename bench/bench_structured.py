"""Benchmark structured output (dgemma.structured).

    python bench/bench_structured.py --engines [--vocab 4000,16000]    # llguidance vs xgrammar vs outlines-core
    python bench/bench_structured.py --protocol [--rows 16]             # host cost of scan/repair per pass, canvas 256

--engines: the three grammar engines on one nested JSON Schema and one valid 256-token canvas, per tokenizer (the
random default model's byte vocabulary, and byte-level BPEs trained here on English text at --vocab sizes): compile
time, the walk over all 256 tokens from the committed state (llguidance: one `validate_tokens` call; the others one
call per token), one token mask (median over the 256 positions), a copy of the state, and a 256-token rollback.
Engines that are not installed are skipped (outlines-core: `pip install outlines-core`).

--protocol: what constraints add to a denoising pass on the host, per pass of --rows rows at canvas 256: `scan` on
a canvas whose accepted prefix grows over the passes with adversarial tokens (mask computed at the first bad
position), the mask's host->device size (bool [V] per masked row), and `repair` + `commit` per finished canvas.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}},
    "addr": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
             "required": ["city", "zip"], "additionalProperties": False},
    "notes": {"type": "string"}},
    "required": ["name", "age", "tags", "addr", "notes"], "additionalProperties": False}
INSTANCE = {"name": "Ada Lovelace", "age": 36, "tags": ["a", "ccc", "bb"], "addr": {"city": "London", "zip": "W1"},
            "notes": "the quick brown fox jumps over the lazy dog " * 30}


def trained_bpe(vocab_size: int):
    """A byte-level BPE trained on English text (CPython's documentation topics)."""
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(pydoc_data.topics.topics.values()), trainer)
    return tok


def tokenizers_under_test(vocabs: list[int]):
    from tokenizers import Tokenizer

    from dgemma.random_model import build_tokenizer_json

    yield "random model (bytes)", Tokenizer.from_str(build_tokenizer_json()), 320
    for v in vocabs:
        tok = trained_bpe(v)
        yield f"BPE {tok.get_vocab_size()}", tok, tok.get_vocab_size()


def _timed(fn, repeat: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def bench_llguidance(tok, vocab_size: int, ids: list[int]) -> dict:
    import llguidance
    import llguidance.numpy as llnp

    start = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok.to_str(), n_vocab=vocab_size, eos_token=1)
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA), log_level=0)
    compile_s = time.perf_counter() - start
    walk = _timed(lambda: matcher.validate_tokens(ids), 20)
    assert matcher.validate_tokens(ids) == len(ids)
    bitmask, masks = llnp.allocate_token_bitmask(1, vocab_size), []
    for t in ids:
        masks.append(_timed(lambda: llnp.fill_next_token_bitmask(matcher, bitmask)))
        matcher.consume_token(t)
    rollback = _timed(lambda: matcher.rollback(len(ids)))
    return dict(compile=compile_s, walk=walk, mask=statistics.median(masks), copy=_timed(matcher.deep_copy, 200),
                rollback=rollback, version=llguidance.get_version() if hasattr(llguidance, "get_version") else "")


def bench_xgrammar(tok, vocab_size: int, ids: list[int]) -> dict:
    import xgrammar as xgr

    start = time.perf_counter()
    # xgrammar takes a transformers tokenizer; from a bare tokenizer.json only through this private detector.
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(tok.to_str())
    vocab = [tok.id_to_token(i) or "" for i in range(tok.get_vocab_size())]
    info = xgr.TokenizerInfo(vocab, meta["vocab_type"], vocab_size=vocab_size, stop_token_ids=[1],
                             add_prefix_space=meta["add_prefix_space"])
    compiled = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    matcher = xgr.GrammarMatcher(compiled, max_rollback_tokens=-1)
    compile_s = time.perf_counter() - start

    def walk():
        accepted = 0
        for t in ids:
            if not matcher.accept_token(t):
                break
            accepted += 1
        matcher.rollback(accepted)
        return accepted

    assert walk() == len(ids)
    walk_s = _timed(walk, 20)
    bitmask, masks = xgr.allocate_token_bitmask(1, vocab_size), []
    for t in ids:
        masks.append(_timed(lambda: matcher.fill_next_token_bitmask(bitmask)))
        matcher.accept_token(t)
    rollback = _timed(lambda: matcher.rollback(len(ids)))
    return dict(compile=compile_s, walk=walk_s, mask=statistics.median(masks), copy=_timed(matcher.fork, 200),
                rollback=rollback)


def bench_outlines_core(tok, vocab_size: int, ids: list[int]) -> dict:
    import outlines_core

    byte_of = _byte_level_decoder()
    start = time.perf_counter()
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    token_bytes: dict = {}
    for i in range(tok.get_vocab_size()):
        piece = tok.id_to_token(i)
        if i != 1 and piece and all(c in byte_of for c in piece):   # it takes a token -> bytes map built by hand
            token_bytes.setdefault(bytes(byte_of[c] for c in piece), []).append(i)
    guide = outlines_core.Guide(outlines_core.Index(regex, outlines_core.Vocabulary(1, token_bytes)))
    compile_s = time.perf_counter() - start
    mask, masks = np.zeros((vocab_size + 31) // 32, dtype=np.int32), []
    walk_start = time.perf_counter()
    for t in ids:
        masks.append(_timed(lambda: guide.write_mask_into(mask.ctypes.data, mask.size, 4)))
        guide.advance(t)
    walk_s = time.perf_counter() - walk_start - sum(masks)
    return dict(compile=compile_s, walk=walk_s, mask=statistics.median(masks), copy=float("nan"),
                rollback=float("nan"), rollback_window=guide.get_allowed_rollback())


def _byte_level_decoder() -> dict:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def run_engines(vocabs: list[int]) -> None:
    engines = [("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar), ("outlines-core", bench_outlines_core)]
    print("| tokenizer | engine | compile ms | walk 256 ms | mask us (median) | copy us | rollback 256 us |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, tok, vocab_size in tokenizers_under_test(vocabs):
        ids = tok.encode(json.dumps(INSTANCE, separators=(",", ":")), add_special_tokens=False).ids[:256]
        for name, bench in engines:
            try:
                r = bench(tok, vocab_size, ids)
            except ImportError:
                print(f"| {label} | {name} | not installed | | | | |")
                continue
            note = f" (rollback window {r['rollback_window']})" if "rollback_window" in r else ""
            print(f"| {label} | {name} | {1e3 * r['compile']:.1f} | {1e3 * r['walk']:.2f} | {1e6 * r['mask']:.0f} | "
                  f"{1e6 * r['copy']:.1f} | {1e6 * r['rollback']:.1f}{note} |")


def run_protocol(rows: int, canvas: int = 256, passes: int = 16) -> None:
    from dgemma.structured import StructuredSpec, compile

    print(f"| tokenizer | scan per pass ({rows} rows) ms | masks per pass | mask bytes to the device | "
          "repair+commit per canvas ms |")
    print("| --- | --- | --- | --- | --- |")
    cases = list(tokenizers_under_test([8000]))
    cases.append((cases[-1][0] + ", logits padded to Gemma's 262144", cases[-1][1], 262144))
    for label, tok, vocab_size in cases:
        grammar = compile(StructuredSpec.json_schema(SCHEMA), tok, vocab_size, [1])
        rng = np.random.default_rng(0)
        valid = tok.encode(json.dumps(INSTANCE), add_special_tokens=False).ids[:canvas]
        row_states = [grammar.new_row() for _ in range(rows)]
        scan_s, masked = 0.0, 0
        for p in range(passes):
            # the accepted prefix grows over the passes; a few adversarial tokens in it
            canvases = np.tile(np.asarray(valid), (rows, 1))
            noise = rng.random((rows, canvas)) < 0.02
            canvases[noise] = rng.integers(0, vocab_size, int(noise.sum()))
            accepted = rng.random((rows, canvas)) < (p + 1) / passes
            start = time.perf_counter()
            for r, state in enumerate(row_states):
                masked += state.scan(canvases[r], accepted[r])[1] is not None
            scan_s += time.perf_counter() - start
        candidates = np.tile(np.asarray(valid)[:, None], (1, 4))
        start = time.perf_counter()
        for state in row_states:
            tokens, fallback = state.repair(np.asarray(valid), candidates)
            state.commit(tokens)
        repair_s = (time.perf_counter() - start) / rows
        print(f"| {label} (V={vocab_size}) | {1e3 * scan_s / passes:.2f} | {masked / passes:.1f} | "
              f"{vocab_size} per masked row (bool) | {1e3 * repair_s:.2f} |")
    print("(a pass masks at most one position per row: the mask is one bool [V] row per masked row, "
          "256 KiB at V = 262144)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", action="store_true", help="compare llguidance, xgrammar and outlines-core")
    parser.add_argument("--vocab", default="4000,16000", help="BPE vocab sizes to train for --engines")
    parser.add_argument("--protocol", action="store_true", help="host cost of the canvas protocol per pass")
    parser.add_argument("--rows", type=int, default=16)
    args = parser.parse_args()
    if args.engines:
        run_engines([int(v) for v in args.vocab.split(",") if v])
    if args.protocol:
        run_protocol(args.rows)
    if not (args.engines or args.protocol):
        parser.error("choose --engines and/or --protocol")


if __name__ == "__main__":
    main()
