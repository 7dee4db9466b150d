"""Sudoku as a DiffusionGemma task: a 16-token vocabulary, prompt/target encoding, and a constraint checker.

Framework-free (no torch, no mlx): the data side of the fine-tuning recipe and the evaluation side of generation both
use it. `tokenizers` is needed only to write/read tokenizer.json.

Layout of one example (canvas_length C, default 96):
    prompt  = <bos> c0 .. c80 <sep>          83 tokens; a cell is '1'..'9' or '.' for a blank
    target  = s0 .. s80 <eos> <pad>*         C tokens; the solution's 81 digits, then eos, then pads
so one canvas holds the whole answer and `Model.generate(puzzle)` (with this tokenizer, whose post-processor adds
<bos> and <sep>) asks for exactly what the model was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .sudoku import parse, violations

PAD, EOS, BOS, UNK, SEP = 0, 1, 2, 3, 4
BLANK_ID = 5
DIGIT_IDS = tuple(range(6, 15))          # '1'..'9'
RESERVED = 15
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<sep>"]
VOCAB = SPECIAL_TOKENS + ["."] + [str(d) for d in range(1, 10)] + ["<reserved>"]
VOCAB_SIZE = len(VOCAB)                   # 16
CANVAS_LENGTH = 96                        # 81 digits + eos, rounded up to a multiple of 32
PROMPT_LENGTH = 83                        # bos + 81 cells + sep

_CHAR_TO_ID = {VOCAB[i]: i for i in range(BLANK_ID, BLANK_ID + 10)}
_ID_TO_CHAR = {i: c for c, i in _CHAR_TO_ID.items()}
# Host lookup tables: token id -> board char ('.' for anything that is not a digit).
_ID_TO_BOARD = np.array(["."] * VOCAB_SIZE)
for _d, _i in zip("123456789", DIGIT_IDS):
    _ID_TO_BOARD[_i] = _d


def encode_prompt(puzzle: str) -> list[int]:
    """<bos> + 81 cell tokens + <sep> for a puzzle (any form `dgemma.sudoku.parse` accepts)."""
    board = parse(puzzle)
    return [BOS] + [_CHAR_TO_ID[c] for c in board] + [SEP]


def encode_target(solution: str, canvas_length: int = CANVAS_LENGTH) -> list[int]:
    """81 solution digits + <eos>, padded with <pad> to `canvas_length` (which must be >= 82)."""
    board = parse(solution)
    if "." in board:
        raise ValueError("a solution must have every cell filled")
    if canvas_length < 82:
        raise ValueError(f"canvas_length must be at least 82 (81 digits + eos), got {canvas_length}")
    return [_CHAR_TO_ID[c] for c in board] + [EOS] + [PAD] * (canvas_length - 82)


def encode_batch(pairs: Sequence[tuple[str, str]], canvas_length: int = CANVAS_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """(prompts [B, 83], targets [B, canvas_length]) int64 arrays for (puzzle, solution) pairs."""
    prompts = np.array([encode_prompt(p) for p, _ in pairs], dtype=np.int64).reshape(len(pairs), PROMPT_LENGTH)
    targets = np.array([encode_target(s, canvas_length) for _, s in pairs], dtype=np.int64)
    return prompts, targets.reshape(len(pairs), canvas_length)


def decode_board(ids: Sequence[int]) -> str:
    """The first 81 tokens as an 81-char board: digits as themselves, anything else (noise, eos, pad) as '.'."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)[:81]
    ids = np.clip(ids, 0, VOCAB_SIZE - 1)
    board = "".join(_ID_TO_BOARD[ids])
    return board + "." * (81 - len(board))


def decode_solution(ids: Sequence[int]) -> str:
    """Generated token ids -> an 81-char board string ('.' where the model did not put a digit)."""
    return decode_board(ids)


def make_checker(puzzles: Sequence[str], *, strict_format: bool = True):
    """checker(row, canvas_tokens [C]) -> bool [C] for `Model.generate(..., checker=)`: True at canvas cells whose digit
    repeats in its row, column or box, or that overwrite one of `puzzles[row]`'s givens (`dgemma.sudoku.violations`).
    With `strict_format`, a cell holding a non-digit token and a position 81 that is not <eos> are flagged too, so a
    finished canvas is only accepted once it is a complete, rule-abiding grid followed by eos."""
    givens = [parse(p) for p in puzzles]

    def checker(row: int, tokens) -> np.ndarray:
        toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        out = np.zeros(toks.shape[0], dtype=bool)
        board = decode_board(toks)
        bad = violations(board, givens[row])
        if bad:
            out[np.fromiter(bad, dtype=np.int64)] = True
        if strict_format:
            n = min(81, toks.shape[0])
            out[:n] |= ~np.isin(toks[:n], DIGIT_IDS)
            if toks.shape[0] > 81:
                out[81] |= toks[81] != EOS
        return out

    return checker


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and model config
# ----------------------------------------------------------------------------------------------------------------


def build_tokenizer_json() -> str:
    """A character-level tokenizer (WordLevel over single characters) for the Sudoku vocabulary. Whitespace is dropped
    and '0' read as a blank by its normalizer; its post-processor wraps a text as <bos> ... <sep>, so
    `Tokenizer.encode(puzzle)` equals `encode_prompt(puzzle)`. Decoding concatenates the digits."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), ""), normalizers.Replace("0", ".")])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS + ["<reserved>"])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <sep>",
                                                       special_tokens=[("<bos>", BOS), ("<sep>", SEP)])
    return tok.to_str()


def write_tokenizer(folder: str | Path) -> None:
    """tokenizer.json + tokenizer_config.json into `folder` (the files `dgemma.load` reads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(build_tokenizer_json())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}, indent=2))


def sudoku_model_config(hidden_size: int = 128, num_hidden_layers: int = 6, num_experts: int = 8,
                        top_k_experts: int = 2, moe_intermediate_size: int = 64, intermediate_size: int = 256,
                        num_attention_heads: int = 4, head_dim: int = 32, canvas_length: int = CANVAS_LENGTH,
                        dtype: str = "float32") -> dict:
    """config.json for a small DiffusionGemma-architecture model over the Sudoku vocabulary: sliding layers with
    one full-attention layer last (as the reference forces), MoE + dense MLP in every layer, soft-capped logits.
    Defaults: ~2.1M parameters. The sliding window (256) covers prompt + canvas, so every layer sees the puzzle."""
    if canvas_length < 82:
        raise ValueError(f"canvas_length must be at least 82 (81 digits + eos), got {canvas_length}")
    n = num_hidden_layers
    text = {
        "model_type": "diffusion_gemma_text", "vocab_size": VOCAB_SIZE, "hidden_size": hidden_size,
        "intermediate_size": intermediate_size, "num_hidden_layers": n, "num_attention_heads": num_attention_heads,
        "num_key_value_heads": max(1, num_attention_heads // 2), "head_dim": head_dim,
        "layer_types": ["sliding_attention"] * (n - 1) + ["full_attention"],
        "per_layer_config": {str(n - 1): {"head_dim": 2 * head_dim, "num_key_value_heads": 1}},
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        },
        "sliding_window": 256, "rms_norm_eps": 1e-6, "num_experts": num_experts, "top_k_experts": top_k_experts,
        "moe_intermediate_size": moe_intermediate_size, "max_position_embeddings": 1024,
        "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": 30.0,
        "pad_token_id": PAD, "eos_token_id": EOS, "bos_token_id": BOS, "tie_word_embeddings": True,
        "use_bidirectional_attention": None, "attention_bias": False, "attention_dropout": 0.0,
    }
    return {"architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
            "canvas_length": canvas_length, "dtype": dtype, "eos_token_id": [EOS], "pad_token_id": PAD,
            "tie_word_embeddings": True, "text_config": text, "_dgemma_note": "Sudoku model (dgemma.sudoku_task)"}


def sudoku_generation_config(canvas_length: int = CANVAS_LENGTH, max_denoising_steps: int = 32) -> dict:
    """generation_config.json: one canvas of new tokens (the whole grid), the released sampler's other defaults."""
    return {"max_denoising_steps": max_denoising_steps,
            "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
            "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1, "confidence_threshold": 0.005,
            "eos_token_id": [EOS], "pad_token_id": PAD, "max_new_tokens": canvas_length}
