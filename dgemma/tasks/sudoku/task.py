"""Sudoku as a DiffusionGemma task: a 128-token vocabulary, prompt/target encoding, and a constraint checker.

Framework-free (no torch, no mlx): the data side of the fine-tuning recipe and the evaluation side of generation both
use it. `tokenizers` is needed only to write/read tokenizer.json.

Layout of one example (canvas_length C, default 82):
    prompt  = <bos> c0 .. c80 <sep> <r1c1> .. <r9c9>     164 tokens; a cell is '1'..'9' or '.' for a blank
    target  = s0 .. s80 <eos> <pad>*                     C tokens; the solution's 81 digits, then eos (then pads)
so one canvas holds the whole answer, and `Model.generate(puzzle)` (with this tokenizer, whose post-processor adds
<bos>, <sep> and the 81 cell tokens) asks for exactly what the model was trained on.

Why the 81 cell tokens: Gemma has no absolute position embedding, only RoPE, which sees relative distances, while
Sudoku's rules are absolute (cell 8 and cell 9 are neighbours but in different rows). The cell tokens are landmarks at
a fixed distance from every canvas cell (canvas cell i sits 81 positions after <r(i//9+1)c(i%9+1)>), so one attention
head can read "which cell am I" and learned embeddings carry row, column and box; they add no information about the
puzzle. A side effect that helps the sampler: uniform noise is 119 times in 128 a token that is not a digit, so the
model sees at once which cells are still noise.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...engine import attempt_seed
from ...training import sampler_generation_config, small_model_config
from .minimal import generate_hard_dataset
from .puzzles import IDENTITY, Symmetry, generate_dataset, is_valid_solution, parse, random_symmetry, violations

if TYPE_CHECKING:
    from ...api import Generation

PAD, EOS, BOS, UNK, SEP = 0, 1, 2, 3, 4
BLANK_ID = 5
DIGIT_IDS = tuple(range(6, 15))           # '1'..'9'
CELL_IDS = tuple(range(16, 97))           # <r1c1> .. <r9c9>
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<sep>"]
CELL_TOKENS = [f"<r{r}c{c}>" for r in range(1, 10) for c in range(1, 10)]
VOCAB = (SPECIAL_TOKENS + ["."] + [str(d) for d in range(1, 10)] + ["<reserved0>"] + CELL_TOKENS
         + [f"<reserved{i}>" for i in range(1, 32)])
VOCAB_SIZE = len(VOCAB)                   # 128
CANVAS_LENGTH = 82                        # 81 digits + eos
PROMPT_LENGTH = 164                       # bos + 81 cells + sep + 81 cell tokens

_CHAR_TO_ID = {VOCAB[i]: i for i in range(BLANK_ID, BLANK_ID + 10)}
_ID_TO_CHAR = {i: c for c, i in _CHAR_TO_ID.items()}
# Host lookup tables: token id -> board char ('.' for anything that is not a digit).
_ID_TO_BOARD = np.array(["."] * VOCAB_SIZE)
for _d, _i in zip("123456789", DIGIT_IDS):
    _ID_TO_BOARD[_i] = _d


def encode_prompt(puzzle: str) -> list[int]:
    """<bos> + 81 cells + <sep> + the 81 cell tokens for a puzzle (any form `dgemma.sudoku.parse` accepts)."""
    board = parse(puzzle)
    return [BOS] + [_CHAR_TO_ID[c] for c in board] + [SEP] + list(CELL_IDS)


def encode_target(solution: str, canvas_length: int = CANVAS_LENGTH) -> list[int]:
    """81 solution digits + <eos>, padded with <pad> to `canvas_length` (which must be >= 82)."""
    board = parse(solution)
    if "." in board:
        raise ValueError("a solution must have every cell filled")
    if canvas_length < 82:
        raise ValueError(f"canvas_length must be at least 82 (81 digits + eos), got {canvas_length}")
    return [_CHAR_TO_ID[c] for c in board] + [EOS] + [PAD] * (canvas_length - 82)


def encode_batch(pairs: Sequence[tuple[str, str]], canvas_length: int = CANVAS_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """(prompts [B, 164], targets [B, canvas_length]) int64 arrays for (puzzle, solution) pairs."""
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


# Unit membership [81, 27]: rows, columns, boxes (for the batched checker).
_UNITS = np.zeros((81, 27), dtype=np.int32)
for _c in range(81):
    _r, _k = divmod(_c, 9)
    _UNITS[_c, [_r, 9 + _k, 18 + (_r // 3) * 3 + _k // 3]] = 1


class SudokuChecker:
    """The constraint checker of `make_checker`: called per row by the scheduler's protocol, and batched (`many`),
    which the scheduler prefers (one numpy pass over all live rows instead of a Python loop per row)."""

    def __init__(self, puzzles: Sequence[str], strict_format: bool):
        givens = np.full((len(puzzles), 81), -1, dtype=np.int64)
        for i, p in enumerate(puzzles):
            board = parse(p)
            for c, ch in enumerate(board):
                if ch != ".":
                    givens[i, c] = int(ch) - 1
        self.givens = givens
        self.strict_format = strict_format

    def __call__(self, row: int, tokens) -> np.ndarray:
        toks = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        return self.many(np.array([row]), toks)[0]

    def many(self, rows, tokens) -> np.ndarray:
        """bool [n, C] for rows `rows` (prompt indices) and their canvases `tokens` [n, C]."""
        toks = np.asarray(tokens, dtype=np.int64)
        n, width = toks.shape
        cells = min(81, width)
        t = np.full((n, 81), PAD, dtype=np.int64)
        t[:, :cells] = toks[:, :cells]
        is_digit = (t >= DIGIT_IDS[0]) & (t <= DIGIT_IDS[-1])
        digit = np.where(is_digit, t - DIGIT_IDS[0], -1)                       # 0..8, -1 for no digit
        onehot = (digit[..., None] == np.arange(9)).astype(np.int32)             # [n, 81, 9]
        repeated = np.einsum("ncd,cu->nud", onehot, _UNITS) > 1                  # [n, 27 units, 9 digits]
        in_repeat = np.einsum("nud,cu->ncd", repeated.astype(np.int32), _UNITS) > 0
        bad = (onehot.astype(bool) & in_repeat).any(axis=-1)                     # a digit repeated in one of its units
        givens = self.givens[np.asarray(rows, dtype=np.int64)]
        bad |= (givens >= 0) & (digit != givens)                                 # a given overwritten or blanked
        if self.strict_format:
            bad |= ~is_digit
        out = np.zeros((n, width), dtype=bool)
        out[:, :cells] = bad[:, :cells]
        if self.strict_format and width > 81:
            out[:, 81] = toks[:, 81] != EOS
        return out


def make_checker(puzzles: Sequence[str], *, strict_format: bool = True) -> SudokuChecker:
    """checker(row, canvas_tokens [C]) -> bool [C] for `Model.generate(..., checker=)`: True at canvas cells whose digit
    repeats in its row, column or box, or that overwrite one of `puzzles[row]`'s givens (`dgemma.sudoku.violations`).
    With `strict_format`, a cell holding a non-digit token and a position 81 that is not <eos> are flagged too, so a
    finished canvas is only accepted once it is a complete, rule-abiding grid followed by eos. `.many(rows, tokens)`
    checks many rows at once."""
    return SudokuChecker(puzzles, strict_format)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and model config
# ----------------------------------------------------------------------------------------------------------------


def build_tokenizer_json() -> str:
    """A character-level tokenizer (WordLevel over single characters) for the Sudoku vocabulary. Whitespace is dropped
    and '0' read as a blank by its normalizer; its post-processor wraps a text as <bos> ... <sep> <r1c1> .. <r9c9>, so
    `Tokenizer.encode(puzzle)` equals `encode_prompt(puzzle)`. Decoding concatenates the digits."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), ""), normalizers.Replace("0", ".")])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([t for t in VOCAB if t.startswith("<")])
    cells = " ".join(CELL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"<bos> $A <sep> {cells}",
        special_tokens=[("<bos>", BOS), ("<sep>", SEP)] + [(t, i) for t, i in zip(CELL_TOKENS, CELL_IDS)])
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
    return small_model_config(
        vocab_size=VOCAB_SIZE, task="sudoku", note="Sudoku model (dgemma.tasks.sudoku)", hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers, num_experts=num_experts, top_k_experts=top_k_experts,
        moe_intermediate_size=moe_intermediate_size, intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads, head_dim=head_dim, canvas_length=canvas_length, sliding_window=256,
        max_position_embeddings=1024, dtype=dtype, pad=PAD, eos=EOS, bos=BOS)


def sudoku_generation_config(canvas_length: int = CANVAS_LENGTH, max_denoising_steps: int = 32) -> dict:
    """generation_config.json: one canvas of new tokens (the whole grid), the released sampler's other defaults."""
    return sampler_generation_config(canvas_length, max_denoising_steps, pad=PAD, eos=EOS)


# ----------------------------------------------------------------------------------------------------------------
# Solving with a loaded model
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SudokuResult:
    puzzle: str
    solution: str             # the model's board, 81 chars ('.' where it left no digit)
    solved: bool              # complete, breaks no rule, keeps every given
    steps: int                # denoising passes, retries included
    retries: int              # constraint-driven re-denoising rounds
    tokens_per_forward: float
    seconds: float            # the batch's wall time shared evenly among its puzzles
    attempts: int = 1         # canvases denoised side by side for this puzzle (each pass ran that many)
    generation: Generation | None = field(default=None, repr=False)  # the kept canvas's, in the puzzle's frame

    def to_json(self) -> dict:
        return {"puzzle": self.puzzle, "solution": self.solution, "solved": self.solved, "steps": self.steps,
                "retries": self.retries, "tokens_per_forward": round(self.tokens_per_forward, 3),
                "attempts": self.attempts}

    def to_generate_json(self) -> dict:
        """`dgemma generate --json`'s schema (text = the board), plus the puzzle fields of `to_json`."""
        g = self.generation
        s = g.stats
        return {"text": self.solution, "token_ids": g.token_ids, "finish_reason": s.finish_reason,
                "tokens_per_forward": s.tokens_per_forward, "steps_per_canvas": s.steps_per_canvas,
                "decoder_passes": s.decoder_passes, "prompt_tokens": s.prompt_tokens,
                "generated_tokens": s.generated_tokens, "seconds": self.seconds, **self.to_json()}


def is_sudoku_model(model) -> bool:
    """Whether a loaded `dgemma.Model` speaks this task's vocabulary (its tokenizer has the cell tokens)."""
    tok = model.tokenizer
    return (tok is not None and tok.token_to_id(CELL_TOKENS[0]) == CELL_IDS[0]
            and tok.token_to_id(CELL_TOKENS[-1]) == CELL_IDS[-1] and model.config.vocab_size == VOCAB_SIZE)


def check_puzzle(puzzle: str, name: str = "puzzle") -> str:
    """The normalised 81-char puzzle, or ValueError naming `name` and what is wrong (format or clashing givens)."""
    try:
        board = parse(puzzle)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from None
    bad = sorted(violations(board))
    if bad:
        cells = ", ".join(f"r{i // 9 + 1}c{i % 9 + 1}" for i in bad[:4])
        raise ValueError(f"{name}: its givens break the rules (a digit repeats at {cells})")
    return board


def puzzle_views(attempts: int, seed: int) -> list[Symmetry]:
    """The symmetries under which `solve_puzzles` attempts a puzzle sampled with `seed`: the identity, then
    attempts - 1 random ones drawn from that seed. A different view gives the model a different-looking board, so
    its attempts fail less alike than the same board with other noise (on medium puzzles, 8 views solve more than 8
    noise draws: examples/sudoku/RUNS.md)."""
    return [IDENTITY] + [random_symmetry(np.random.default_rng([int(seed), a])) for a in range(1, attempts)]


def solve_puzzles(model, puzzles: Sequence[str], *, seed: int = 0, constraints: bool = True, max_retries: int = 2,
                  attempts: int = 1, renoise: bool = True, batch_size: int = 64, on_step=None,
                  on_batch: Callable[[int], None] | None = None, **sampler) -> list[SudokuResult]:
    """Solve puzzles with a Sudoku model (`is_sudoku_model`); puzzle i uses seed + i.
    `constraints` turns on constraint-aware sampling (`make_checker`: digits that repeat in a row, column or box, or
    overwrite a given, are re-noised; a board stops as soon as it is a solution) and up to `max_retries`
    re-denoising rounds for a canvas that still breaks a rule. `attempts=K` (with constraints) denoises K symmetric
    views of each puzzle side by side (`puzzle_views`) and keeps the first that solves it, else the one with the
    fewest broken cells; its steps are the group's. `renoise=False` (with constraints) keeps the checker to judging
    finished boards: no re-noising while denoising. A batch holds up to `batch_size` canvases (batch_size //
    attempts puzzles). Puzzles are checked first (`check_puzzle`). `on_batch(n)` is called after each batch with its
    number of puzzles (a progress bar)."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    if attempts > 1 and not constraints:
        raise ValueError("parallel attempts need constraints on: the checker is what tells a solved board")
    boards = [check_puzzle(p, f"puzzle {i + 1}") for i, p in enumerate(puzzles)]
    per_batch = max(1, batch_size // attempts)
    out: list[SudokuResult] = []
    for start in range(0, len(boards), per_batch):
        chunk = boards[start:start + per_batch]
        t0 = time.perf_counter()
        views = [puzzle_views(attempts, seed + start + i) for i in range(len(chunk))]
        shown = [v.apply(b) for b, vs in zip(chunk, views) for v in vs]
        extra = {}
        if attempts > 1:
            extra["groups"] = [i for i in range(len(chunk)) for _ in range(attempts)]
        if constraints:
            extra.update(checker=make_checker(shown), max_retries=max_retries, stop_when_valid=True, renoise=renoise)
        gens = model.generate_batch([encode_prompt(b) for b in shown],
                                    seeds=[attempt_seed(seed + start + i, a) for i in range(len(chunk))
                                           for a in range(attempts)],
                                    on_step=on_step, **extra, **sampler)
        each = (time.perf_counter() - t0) / len(chunk)
        for i, board in enumerate(chunk):
            rows = gens[i * attempts:(i + 1) * attempts]
            pick = next(a for a, g in enumerate(rows) if g.stats.chosen)
            g = rows[pick]
            solution = views[i][pick].undo(decode_solution(g.token_ids))
            kept = replace(g, token_ids=undo_tokens(views[i][pick], g.token_ids), text=solution)
            out.append(SudokuResult(board, solution, is_valid_solution(board, solution),
                                    int(sum(g.stats.steps_per_canvas)), int(g.stats.retries),
                                    float(g.stats.tokens_per_forward), each, attempts, kept))
        if on_batch is not None:
            on_batch(len(chunk))
    return out


def undo_tokens(view: Symmetry, ids: Sequence[int]) -> list[int]:
    """A view's canvas tokens in the puzzle's own frame: cells moved back and digits relabelled back (other tokens
    and the positions after the 81 cells as they are; cells missing after an early eos come back as blanks)."""
    ids = [int(t) for t in ids]
    if view == IDENTITY:
        return ids
    cells = ids[:81] + [BLANK_ID] * (81 - len(ids[:81]))
    unlabel = {DIGIT_IDS[int(view.relabel[d]) - 1]: DIGIT_IDS[d - 1] for d in range(1, 10)}
    out = [BLANK_ID] * 81
    for i, j in enumerate(view.cells):
        out[j] = unlabel.get(cells[i], cells[i])
    return out + ids[81:]


def solve_rate(folder, pairs: Sequence[tuple[str, str]], *, backend: str = "cuda", device: str | None = None,
               max_retries: int = 2, seed: int = 0, **sampler) -> dict:
    """Solve rate and mean denoising steps of a Sudoku checkpoint folder on (puzzle, solution) pairs, with
    constraint-aware sampling (the training script's periodic evaluation)."""
    from ...api import load

    results = solve_puzzles(load(folder, backend=backend, device=device), [p for p, _ in pairs], seed=seed,
                            max_retries=max_retries, **sampler)
    n = max(1, len(results))
    return {"solve_rate": sum(r.solved for r in results) / n, "steps": sum(r.steps for r in results) / n}


# Evaluation puzzles: seed HELD_OUT_SEED + 0/1/2 for easy/medium/hard, + 3 for minimal (minimal unique puzzles with
# at most 26 givens: `minimal.generate_hard_dataset`), HELD_OUT_SEED + 100 + G for exactly G givens.
# examples/sudoku/train.py generates its training pools at seed + 0..2 and its own held-out sets at
# seed + 1_000_003 + 0..2 (seed defaults to 0); both stay clear.
HELD_OUT_SEED = 7_340_000
TRAINING_SEEDS = (range(0, 14), range(1_000_003, 1_000_017))
DIFFICULTY_OFFSET = {"easy": 0, "medium": 1, "hard": 2, "minimal": 3}


def puzzle_band(difficulty: str) -> tuple[str | tuple[int, int], int]:
    """(band for `generate_dataset`, seed offset) of a difficulty name, or of a number of givens ("50", 17..80)."""
    if difficulty in DIFFICULTY_OFFSET:
        return difficulty, DIFFICULTY_OFFSET[difficulty]
    try:
        givens = int(difficulty)
    except ValueError:
        raise ValueError(f"unknown difficulty {difficulty!r}: easy, medium, hard, minimal or a number of givens "
                         "(17-80)") from None
    if not 17 <= givens <= 80:
        raise ValueError(f"a puzzle with a unique solution has 17 to 80 givens, got {givens}")
    return (givens, givens), 100 + givens


def parse_difficulties(spec: str) -> list[str]:
    """A comma-separated --difficulties value as a list, each checked by `puzzle_band` (ValueError names the bad
    one)."""
    names = [d for d in spec.split(",") if d]
    for d in names:
        puzzle_band(d)
    return names


def held_out_puzzles(difficulty: str, n: int, seed: int = HELD_OUT_SEED) -> list[tuple[str, str]]:
    """`n` (puzzle, solution) pairs of a difficulty (easy, medium, hard, or a number of givens such as "50") that no
    training run of the recipe has seen (ValueError for a seed that training uses)."""
    band, offset = puzzle_band(str(difficulty))
    s = seed + offset
    if any(s in r for r in TRAINING_SEEDS):
        raise ValueError(f"puzzle seed {s} is one examples/sudoku/train.py uses for training or its own "
                         "evaluation; pick another --seed")
    if band == "minimal":
        return generate_hard_dataset(n, seed=s)
    return generate_dataset(n, band, seed=s)
